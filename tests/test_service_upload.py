"""Uploads and downloads over real localhost gRPC: resume, idempotency, rejection, offsets."""
import hashlib
import json
import os
import time
from dataclasses import replace

import grpc
import pytest
import torch
from safetensors.torch import save_file

from crosslm_client.transport import CrossLMClient, RetryPolicy, TransportError
from crosslm_shared import convert
from crosslm_shared.bundle import FileEntry, make_manifest
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2 as pb
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2_grpc as pb_grpc
from crosslm_shared.transfer import MIN_CHUNK_SIZE, crc32c
from service_helpers import LABELS, address, server_config, start_server, tiny_bundle

CHUNK = MIN_CHUNK_SIZE
FAST = RetryPolicy(initial_s=0.01, max_s=0.05, max_attempts=5)
META = (("x-crosslm-silo", "a"),)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # echo: the big bundle's weights are one random tensor, a transfer test and no loadable model
    s = start_server(server_config(tmp_path_factory.mktemp("server"), engine="fakes.echo_engine:EchoEngine"))
    yield s
    s.stop(grace=2)


@pytest.fixture(scope="module")
def big_bundle(tmp_path_factory):
    """A bundle whose weights span several chunks (a valid header; the engine never loads it)."""
    root = tmp_path_factory.mktemp("big")
    folder, _ = tiny_bundle(root)
    save_file({"w": torch.randn(7 * CHUNK // 4 + 5)}, str(folder / "model.safetensors"))
    return folder, make_manifest(folder, task="rt", silo="a", arch="tiny", labels=LABELS)


def stub(server):
    return pb_grpc.CrossLMStub(grpc.insecure_channel(address(server)))


def bytes_in(server) -> float:
    return server.metrics.bytes_in._value.get()


def test_cut_upload_resumes_from_committed_offset(server, big_bundle):
    folder, manifest = big_bundle
    client = CrossLMClient(address(server), "a", chunk_size=CHUNK, retry=FAST)
    sent = []

    def cut_after_three(chunk):
        sent.append(chunk)
        if len(sent) == 4:
            client.channel.close()  # the test hook: drop the connection mid-file

    before = bytes_in(server)
    client.upload(folder, manifest, "a-resume-0001", on_chunk=cut_after_three)
    received = bytes_in(server) - before
    assert received <= manifest.total_size + CHUNK, "server re-received more than one chunk"
    committed, complete = client.query_upload("a-resume-0001")
    assert complete and committed == {f.name: f.size for f in manifest.files}
    held = server.service.bundle_dir("a-resume-0001")
    assert hashlib.sha256((held / "model.safetensors").read_bytes()).hexdigest() == manifest.file("model.safetensors").sha256
    client.close()


def test_same_upload_id_twice_does_no_work(server, tmp_path):
    folder, manifest = tiny_bundle(tmp_path)
    with CrossLMClient(address(server), "a", retry=FAST) as client:
        client.upload(folder, manifest, "a-twice-0001")
        before = bytes_in(server)
        status = stub(server).Upload(iter([pb.UploadRequest(header=pb.UploadHeader(
            upload_id="a-twice-0001", manifest=convert.manifest_to_pb(manifest)))]), metadata=META)
        assert status.complete and bytes_in(server) == before
        client.upload(folder, manifest, "a-twice-0001")
        assert bytes_in(server) == before
        other = replace(manifest, heldout_accuracy=0.99)
        with pytest.raises(TransportError, match="ALREADY_EXISTS.*new upload id"):
            client.upload(folder, other, "a-twice-0001")


def test_sha_mismatch_is_rejected_and_leaves_nothing(server, tmp_path):
    folder, manifest = tiny_bundle(tmp_path)
    bad = replace(manifest, files=tuple(replace(f, sha256="0" * 64) if f.name == "config.json" else f
                                        for f in manifest.files))
    with CrossLMClient(address(server), "a", retry=FAST) as client:
        with pytest.raises(TransportError, match="INVALID_ARGUMENT.*SHA-256"):
            client.upload(folder, bad, "a-badsha-001")
        assert client.query_upload("a-badsha-001") is None
    assert not (server.service.data_dir / "uploads" / "a-badsha-001").exists()
    assert not server.service.bundle_dir("a-badsha-001").exists()


def test_bad_bundle_content_is_rejected_and_leaves_nothing(server, tmp_path):
    folder, _ = tiny_bundle(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"auto_map": {"AutoModel": "x.Y"}}))
    manifest = make_manifest(folder, task="rt", silo="a", arch="tiny", labels=LABELS)
    with CrossLMClient(address(server), "a", retry=FAST) as client:
        with pytest.raises(TransportError, match="INVALID_ARGUMENT.*auto_map"):
            client.upload(folder, manifest, "a-automa-001")
        assert client.query_upload("a-automa-001") is None
    assert not (server.service.data_dir / "uploads" / "a-automa-001").exists()


def test_protocol_errors_have_codes_and_hints(server, tmp_path):
    folder, manifest = tiny_bundle(tmp_path)
    s = stub(server)
    header = pb.UploadRequest(header=pb.UploadHeader(upload_id="a-proto-0001", manifest=convert.manifest_to_pb(manifest)))
    with pytest.raises(grpc.RpcError) as e:
        s.Upload(iter([header]))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "x-crosslm-silo" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        s.Upload(iter([pb.UploadRequest(chunk=pb.Chunk(file="config.json"))]), metadata=META)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UploadHeader" in e.value.details()
    data = (folder / "config.json").read_bytes()
    corrupt = pb.UploadRequest(chunk=pb.Chunk(file="config.json", offset=0, data=data, crc32c=crc32c(data) ^ 1))
    with pytest.raises(grpc.RpcError) as e:
        s.Upload(iter([header, corrupt]), metadata=META)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "CRC" in e.value.details()
    skip = pb.UploadRequest(chunk=pb.Chunk(file="config.json", offset=5, data=data, crc32c=crc32c(data)))
    with pytest.raises(grpc.RpcError) as e:
        s.Upload(iter([header, skip]), metadata=META)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "resume from 0" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        s.QueryUpload(pb.QueryUploadRequest(upload_id="nope-00000"), metadata=META)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    evil = replace(manifest, files=manifest.files + (FileEntry("pytorch_model.bin", 1, "0" * 64),))
    with pytest.raises(grpc.RpcError) as e:
        s.Upload(iter([pb.UploadRequest(header=pb.UploadHeader(upload_id="a-proto-0002",
                                                               manifest=convert.manifest_to_pb(evil)))]), metadata=META)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not allowed" in e.value.details()


def test_oversized_bundle_is_resource_exhausted(tmp_path):
    s = start_server(server_config(tmp_path / "srv", max_bundle_bytes=1000))
    try:
        folder, manifest = tiny_bundle(tmp_path)
        with CrossLMClient(address(s), "a", retry=FAST) as client:
            with pytest.raises(TransportError, match="RESOURCE_EXHAUSTED.*cap"):
                client.upload(folder, manifest, "a-huge-00001")
    finally:
        s.stop(grace=1)


def test_download_from_an_offset(server, big_bundle, tmp_path):
    folder, manifest = big_bundle
    small, small_manifest = tiny_bundle(tmp_path)
    with CrossLMClient(address(server), "a", retry=FAST) as client:
        client.upload(small, small_manifest, "a-dl-000001")
        sub = client.submit("a-dl-000001")
        list(client.watch(sub.submission_id))
        result = client.get_submission(sub.submission_id).result
        entry = result.file("model.safetensors")
        whole = b"".join(m.data for m in stub(server).Download(pb.DownloadRequest(
            submission_id=sub.submission_id, file=entry.name), metadata=META))
        tail = list(stub(server).Download(pb.DownloadRequest(
            submission_id=sub.submission_id, file=entry.name, offset=1000), metadata=META))
        assert tail[0].offset == 1000 and b"".join(m.data for m in tail) == whole[1000:]
        assert hashlib.sha256(whole).hexdigest() == entry.sha256
        # a partial file on the silo's side resumes where it stopped
        dest = tmp_path / "dl"
        dest.mkdir()
        (dest / "model.safetensors.part").write_bytes(whole[:777])
        client.download(sub.submission_id, result, dest)
        assert (dest / "model.safetensors").read_bytes() == whole
        with pytest.raises(grpc.RpcError) as e:
            list(stub(server).Download(pb.DownloadRequest(submission_id=sub.submission_id, file=entry.name,
                                                          offset=entry.size + 1), metadata=META))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_stalled_upload_is_cut_after_the_idle_timeout_and_resumes(tmp_path, big_bundle):
    folder, manifest = big_bundle
    s = start_server(server_config(tmp_path / "srv", idle_timeout_s=0.3, engine="fakes.echo_engine:EchoEngine"))
    try:
        entry = manifest.file("model.safetensors")
        data = (folder / entry.name).read_bytes()[:CHUNK]

        def stalling():
            yield pb.UploadRequest(header=pb.UploadHeader(upload_id="a-stall-0001",
                                                          manifest=convert.manifest_to_pb(manifest)))
            yield pb.UploadRequest(chunk=pb.Chunk(file=entry.name, offset=0, data=data, crc32c=crc32c(data)))
            time.sleep(3)

        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            stub(s).Upload(stalling(), metadata=META)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 2.5
        assert "idle_timeout_s" in e.value.details()
        with CrossLMClient(address(s), "a", chunk_size=CHUNK, retry=FAST) as client:
            assert client.query_upload("a-stall-0001")[0][entry.name] == CHUNK
            before = bytes_in(s)
            client.upload(folder, manifest, "a-stall-0001")
            assert bytes_in(s) - before == manifest.total_size - CHUNK
    finally:
        s.stop(grace=1)


def test_an_upload_resumes_across_a_server_restart(tmp_path, big_bundle):
    folder, manifest = big_bundle
    config = server_config(tmp_path / "srv", engine="fakes.echo_engine:EchoEngine")
    s = start_server(config)
    client = CrossLMClient(address(s), "a", chunk_size=CHUNK, retry=RetryPolicy(max_attempts=1))
    sent = []

    def cut(chunk):
        sent.append(chunk)
        if len(sent) == 5:
            time.sleep(0.3)  # let the first chunks reach the server
            client.channel.close()

    with pytest.raises(TransportError):
        client.upload(folder, manifest, "a-restart-01", on_chunk=cut)
    s.stop(grace=1)
    held = config.server.data_dir / "uploads" / "a-restart-01"
    on_disk = sum(p.stat().st_size for p in held.iterdir())
    assert 0 < on_disk < manifest.total_size
    s2 = start_server(config)
    try:
        with CrossLMClient(address(s2), "a", chunk_size=CHUNK, retry=FAST) as c2:
            c2.upload(folder, manifest, "a-restart-01")
            assert bytes_in(s2) == manifest.total_size - on_disk
            assert c2.query_upload("a-restart-01")[1] is True
    finally:
        s2.stop(grace=1)


def test_memory_stays_flat_while_a_large_bundle_moves(tmp_path):
    """Python-side allocations stay at a few chunks for a 48 MiB bundle, up and down, both ends in one process."""
    import tracemalloc

    folder, _ = tiny_bundle(tmp_path / "silo")
    n = 48 * 1024 * 1024 // 4
    head = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    head += b" " * (-len(head) % 8)
    block = os.urandom(1024 * 1024)
    with (folder / "model.safetensors").open("wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for _ in range(48):
            f.write(block)
    manifest = make_manifest(folder, task="rt", silo="a", arch="tiny", labels=LABELS)
    s = start_server(server_config(tmp_path / "srv"), engine_factory=lambda: _Echo())
    try:
        with CrossLMClient(address(s), "a", retry=FAST) as client:
            tracemalloc.start()
            client.upload(folder, manifest, "a-flat-00001")
            sub = client.submit("a-flat-00001")
            list(client.watch(sub.submission_id))
            client.download(sub.submission_id, client.get_submission(sub.submission_id).result, tmp_path / "back")
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert (tmp_path / "back" / "model.safetensors").stat().st_size == manifest.file("model.safetensors").size
        assert peak < 16 * 1024 * 1024, f"peak Python allocation {peak / 2**20:.1f} MiB for a 48 MiB bundle"
    finally:
        s.stop(grace=1)


class _Echo:
    def ready(self):
        return True

    def run_round(self, request, emit):
        from crosslm_server.engines.api import RoundOutcome

        return RoundOutcome(request.slm_dir, {})
