"""Chunked lazy transfer: CRC, ordered appends, resume after restart, verify-then-rename."""
import hashlib
import os
import subprocess
import sys

import pytest

from crosslm_shared.errors import BundleError, ConfigError
from crosslm_shared.transfer import (MIN_CHUNK_SIZE, Chunk, ChunkError, OffsetError, PartialFile,
                                     check_chunk_size, committed_size, crc32c, iter_chunks)


def test_crc32c_is_castagnoli():
    assert crc32c(b"123456789") == 0xE3069283


def test_chunk_size_bounds():
    assert check_chunk_size(1 << 20) == 1 << 20
    for bad in (1024, 8 << 20):
        with pytest.raises(ConfigError, match="chunk_size"):
            check_chunk_size(bad)


def test_round_trip_with_resume_after_restart(tmp_path):
    src = tmp_path / "src.bin"
    data = os.urandom(3 * MIN_CHUNK_SIZE + 123)
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    final = tmp_path / "out" / "model.safetensors"
    chunks = list(iter_chunks(src, name="model.safetensors", chunk_size=MIN_CHUNK_SIZE))
    assert [c.offset for c in chunks] == [0, MIN_CHUNK_SIZE, 2 * MIN_CHUNK_SIZE, 3 * MIN_CHUNK_SIZE]
    part = PartialFile(final, size=len(data), sha256=sha)
    part.write(chunks[0])
    part.write(chunks[1])
    assert committed_size(final) == 2 * MIN_CHUNK_SIZE
    resumed = PartialFile(final, size=len(data), sha256=sha)  # a new process picks it up
    assert resumed.committed == 2 * MIN_CHUNK_SIZE
    with pytest.raises(OffsetError, match="resume from"):
        resumed.write(chunks[0])
    for c in iter_chunks(src, name="model.safetensors", offset=resumed.committed, chunk_size=MIN_CHUNK_SIZE):
        resumed.write(c)
    assert resumed.finish().read_bytes() == data
    assert committed_size(final) == len(data)


def test_corrupt_chunk_and_overrun_are_refused(tmp_path):
    part = PartialFile(tmp_path / "f", size=4, sha256="0" * 64)
    with pytest.raises(ChunkError, match="CRC"):
        part.write(Chunk("f", 0, b"abcd", crc32c(b"abce")))
    with pytest.raises(ChunkError, match="past"):
        part.write(Chunk("f", 0, b"abcde", crc32c(b"abcde")))
    assert part.committed == 0


def test_hash_mismatch_leaves_nothing(tmp_path):
    final = tmp_path / "f"
    part = PartialFile(final, size=4, sha256="0" * 64)
    part.write(Chunk("f", 0, b"abcd", crc32c(b"abcd")))
    with pytest.raises(BundleError, match="SHA-256"):
        part.finish()
    assert list(tmp_path.iterdir()) == []


def test_durable_file_is_fsynced_every_few_mib_and_when_closed(tmp_path, monkeypatch):
    import crosslm_shared.transfer as transfer
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(transfer.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    data = os.urandom(5 * MIN_CHUNK_SIZE)
    final = tmp_path / "f"
    part = PartialFile(final, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                       sync_every=2 * MIN_CHUNK_SIZE)
    chunks = list(iter_chunks_of(data, MIN_CHUNK_SIZE))
    for c in chunks[:3]:
        part.write(c)
    assert len(synced) == 1  # after 2 chunks; the third waits
    part.close()  # a stream ended: what it wrote is durable, the handle released
    assert len(synced) == 2 and part._fd is None
    for c in chunks[3:]:  # the next stream reopens
        part.write(c)
    assert part.finish().read_bytes() == data


def test_not_durable_never_fsyncs_the_file(tmp_path, monkeypatch):
    import crosslm_shared.transfer as transfer
    files = []
    monkeypatch.setattr(transfer.os, "fsync", lambda fd: files.append(fd))
    data = os.urandom(3 * MIN_CHUNK_SIZE)
    part = PartialFile(tmp_path / "f", size=len(data), sha256=hashlib.sha256(data).hexdigest(), durable=False,
                       sync_every=MIN_CHUNK_SIZE)
    for c in iter_chunks_of(data, MIN_CHUNK_SIZE):
        part.write(c)
    part.close()
    assert files == []


def test_hashing_on_a_thread_equals_hashlib(tmp_path):
    data = os.urandom(7 * MIN_CHUNK_SIZE + 5)
    part = PartialFile(tmp_path / "f", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    for c in iter_chunks_of(data, MIN_CHUNK_SIZE):
        part.write(c)
    assert part.finish().read_bytes() == data  # finish() checked the digest


def iter_chunks_of(data: bytes, size: int):
    for offset in range(0, len(data), size):
        block = data[offset:offset + size]
        yield Chunk("f", offset, block, crc32c(block))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
@pytest.mark.parametrize("env, expected", [("1", "True"), ("0", "False")])
def test_malloc_tuning_applies_once_per_process_and_can_be_turned_off(env, expected):
    code = ("from crosslm_shared.transfer import tune_malloc_for_chunks as t; "
            "print(t(), t())")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "CROSSLM_TUNE_MALLOC": env},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [expected, expected]
