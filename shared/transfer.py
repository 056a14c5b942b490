"""Chunked, resumable file transfer, independent of gRPC.

Both sides read and write lazily: a sender yields one chunk at a time from disk, a receiver
appends each chunk to a `.part` file, hashes it as it arrives (on a helper thread), fsyncs
every few MiB, and renames the file into place only after its SHA-256 matched. Memory stays at about one chunk, whatever the
model size. Chunks carry a CRC-32C (Castagnoli, via google-crc32c's C implementation) so a
corrupt chunk is refused before it touches the file.
"""
from __future__ import annotations

import hashlib
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import google_crc32c

from crosslm_shared.bundle import open_regular
from crosslm_shared.errors import BundleError, ChunkError, ConfigError, OffsetError

KiB = 1024
MiB = 1024 * KiB
DEFAULT_CHUNK_SIZE = 1 * MiB
MIN_CHUNK_SIZE = 256 * KiB
MAX_CHUNK_SIZE = 4 * MiB
PART_SUFFIX = ".part"
_HASH_BLOCK = 1 * MiB
SYNC_EVERY = 8 * MiB  # a durable .part file is fsynced after this many bytes (and when its stream ends)
_INLINE_HASH_BYTES = 64 * KiB




@dataclass(frozen=True)
class Chunk:
    file: str
    offset: int
    data: bytes
    crc32c: int


def crc32c(data: bytes) -> int:
    return google_crc32c.value(data)


def check_chunk_size(size: int) -> int:
    if not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
        raise ConfigError(f"chunk_size={size} is out of range: use {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")
    return size


def iter_chunks(path: Path, *, name: str | None = None, offset: int = 0,
                chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[Chunk]:
    """Yield a file's bytes from `offset` as chunks, reading one chunk at a time (a link is
    refused, never followed: see `open_regular`)."""
    name = name or path.name
    with open_regular(path) as f:
        f.seek(offset)
        while data := f.read(chunk_size):
            yield Chunk(name, offset, data, crc32c(data))
            offset += len(data)


class _BackgroundSha256:
    """SHA-256 fed on a helper thread, so the receiving thread takes the next chunk meanwhile.

    hashlib releases the GIL on large buffers, so the hash runs on another core. At most
    `depth` chunks wait (memory stays at a few chunks); `hexdigest()` waits for them.
    Small updates while the thread is idle are hashed inline.
    """

    def __init__(self, h=None, *, depth: int = 4):
        self._h = h or hashlib.sha256()
        self._depth = depth
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None

    def update(self, data) -> None:
        if self._thread is None and len(data) < _INLINE_HASH_BYTES:
            self._h.update(data)
            return
        if self._thread is None:
            self._queue = queue.Queue(self._depth)
            self._thread = threading.Thread(target=self._run, args=(self._queue,), name="sha256", daemon=True)
            self._thread.start()
        self._queue.put(data)

    def _run(self, q: queue.Queue) -> None:
        while (data := q.get()) is not None:
            self._h.update(data)

    def drain(self) -> None:
        """Wait until every chunk given so far is hashed; stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = self._queue = None

    def hexdigest(self) -> str:
        self.drain()
        return self._h.hexdigest()


class PartialFile:
    """A file being received: `<final>.part`, appended in order, hashed as it arrives.

    Contract: `committed` is the number of bytes written to the `.part` file: they survive a
    crash of this process at once (the OS holds them); with `durable` they are fsynced every
    `sync_every` bytes and on `close()`, so an OS crash loses at most the last `sync_every`
    bytes, and a resume starts from the shorter file (the final SHA-256 check stands guard
    either way). A chunk is accepted only at exactly `committed` and with a matching CRC;
    `finish()` renames the file to its final name only when size and SHA-256 match, and
    deletes it otherwise. Call `close()` when a stream ends without finishing: it syncs and
    releases the file handle and the hashing thread (a later `write` reopens them).
    """

    def __init__(self, final: Path, *, size: int, sha256: str, durable: bool = True,
                 sync_every: int = SYNC_EVERY):
        self.final = final
        self.part = final.with_name(final.name + PART_SUFFIX)
        self.size = size
        self.sha256 = sha256
        self.durable, self.sync_every = durable, sync_every
        self._hash = _BackgroundSha256()
        self._fd: int | None = None
        self._unsynced = 0
        self.committed = 0
        if self.part.exists():
            self._rehash_existing()

    def _rehash_existing(self) -> None:
        """Rebuild the running hash from the bytes already on disk (after a restart)."""
        h = hashlib.sha256()
        with self.part.open("rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
                self.committed += len(block)
        self._hash = _BackgroundSha256(h)
        if self.committed > self.size:
            self.part.unlink()
            self._hash, self.committed = _BackgroundSha256(), 0

    def write(self, chunk: Chunk) -> None:
        if chunk.offset != self.committed:
            raise OffsetError(f"file {chunk.file!r}: chunk at offset {chunk.offset} but "
                              f"{self.committed} bytes are committed; resume from {self.committed}")
        if crc32c(chunk.data) != chunk.crc32c:
            raise ChunkError(f"file {chunk.file!r}: CRC-32C mismatch in the chunk at offset "
                             f"{chunk.offset}; resend it")
        if self.committed + len(chunk.data) > self.size:
            raise ChunkError(f"file {chunk.file!r}: chunk at offset {chunk.offset} runs past the "
                             f"manifest size {self.size}")
        if self._fd is None:
            self.part.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        view = memoryview(chunk.data)
        while view:
            view = view[os.write(self._fd, view):]
        self._hash.update(chunk.data)
        self.committed += len(chunk.data)
        self._unsynced += len(chunk.data)
        if self.durable and self._unsynced >= self.sync_every:
            os.fsync(self._fd)
            self._unsynced = 0

    def close(self) -> None:
        """Make what was written durable (if `durable`) and release the file and the hash thread."""
        if self._fd is not None:
            try:
                if self.durable and self._unsynced:
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd, self._unsynced = None, 0
        self._hash.drain()

    @property
    def done(self) -> bool:
        return self.committed == self.size

    def finish(self) -> Path:
        """Verify and rename into place; on a hash mismatch delete the bytes and raise."""
        if not self.done:
            raise OffsetError(f"file {self.final.name!r} has {self.committed} of {self.size} bytes")
        self.close()
        if self.size == 0:
            self.part.parent.mkdir(parents=True, exist_ok=True)
            self.part.touch()
        digest = self._hash.hexdigest()
        if digest != self.sha256:
            self.part.unlink(missing_ok=True)
            raise BundleError(f"file {self.final.name!r}: SHA-256 {digest} does not match the "
                              f"manifest's {self.sha256}; the bytes were discarded, upload again")
        os.replace(self.part, self.final)
        _fsync_dir(self.final.parent)
        return self.final


def committed_size(final: Path) -> int:
    """Bytes held for a file being received: its full size once finished, else the .part size."""
    if final.exists():
        return final.stat().st_size
    part = final.with_name(final.name + PART_SUFFIX)
    return part.stat().st_size if part.exists() else 0


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class IdleWatchdog:
    """Calls `on_idle` once when `kick()` has not been called for `timeout_s` seconds.

    Transfers use idle timeouts, never total deadlines: a slow link that keeps moving bytes
    is never cut, a stalled one is (and then resumes from its committed offset).
    """

    def __init__(self, timeout_s: float, on_idle, *, name: str = "idle-watchdog"):
        self._time = time.monotonic
        self.timeout_s, self.on_idle = timeout_s, on_idle
        self.fired = False
        self._held = False
        self._last = self._time()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=name, daemon=True)
        if timeout_s > 0:
            self._thread.start()

    def kick(self) -> None:
        self._last = self._time()

    def hold(self, held: bool) -> None:
        """While held (our side is working, not waiting on the peer) the watchdog never fires; the
        idle clock restarts on release."""
        self._held = held
        self.kick()

    def close(self) -> None:
        self._closed.set()

    def __enter__(self) -> "IdleWatchdog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _watch(self) -> None:
        while not self._closed.wait(max(0.01, self._last + self.timeout_s - self._time())):
            if not self._held and self._time() - self._last >= self.timeout_s:
                self.fired = True
                self.on_idle()
                return


_MALLOC_TUNED = False


def tune_malloc_for_chunks() -> bool:
    """Keep chunk-sized buffers on glibc's heap instead of a fresh mmap per buffer.

    Each chunk (1 MiB) lives in several buffers at once (grpc's message, the chunk's data, the
    hashing queue); above glibc's mmap threshold each is a fresh mapping whose pages fault in one
    by one: 1.3 ms of CPU per MiB on the benchmark VM against 0.07 ms from the heap (measured,
    `docs/performance.md`). Raising the mmap threshold to 4 MiB and the trim threshold to 32 MiB
    keeps them on the heap and bounds what the process keeps. Linux with glibc only; a no-op
    elsewhere, and with ``CROSSLM_TUNE_MALLOC=0``. Process-wide: call it from a program's entry
    point, once."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("CROSSLM_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return _MALLOC_TUNED
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        _MALLOC_TUNED = bool(libc.mallopt(m_mmap_threshold, 4 << 20)) and bool(libc.mallopt(m_trim_threshold, 32 << 20))
    except (OSError, AttributeError):
        _MALLOC_TUNED = False
    return _MALLOC_TUNED
