"""Hostile inputs over real gRPC: each is refused with the right code and leaves nothing behind."""
from dataclasses import replace

import grpc
import pytest

from crosslm_shared import convert
from crosslm_shared.bundle import FileEntry
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2 as pb
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2_grpc as pb_grpc
from crosslm_shared.transfer import crc32c
from service_helpers import address, server_config, start_server, tiny_bundle

pytestmark = pytest.mark.hostile
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # many cases leave a held (unsubmitted) upload of silo a: the pending-upload quota has its own test
    s = start_server(server_config(tmp_path_factory.mktemp("server"), max_pending_uploads_per_silo=64))
    yield s
    s.stop(grace=1)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("silo"))


def header(upload_id, manifest):
    return pb.UploadRequest(header=pb.UploadHeader(upload_id=upload_id, manifest=convert.manifest_to_pb(manifest)))


def chunk(name, offset, data):
    return pb.UploadRequest(chunk=pb.Chunk(file=name, offset=offset, data=data, crc32c=crc32c(data)))


def upload(server, messages, silo="a"):
    stub = pb_grpc.CrossLMStub(grpc.insecure_channel(address(server)))
    with pytest.raises(grpc.RpcError) as e:
        stub.Upload(iter(messages), metadata=(("x-crosslm-silo", silo),))
    return e.value.code(), e.value.details()


def cases(manifest, folder):
    config = (folder / "config.json").read_bytes()
    size = manifest.file("config.json").size
    return {
        "upload id escaping the data dir": ([header("../../../etc/x", manifest)], "a",
                                            grpc.StatusCode.INVALID_ARGUMENT, "upload_id"),
        "file name escaping the bundle": ([header("a-hostile-01", replace(
            manifest, files=manifest.files + (FileEntry("../config.json", 1, "0" * 64),)))], "a",
            grpc.StatusCode.INVALID_ARGUMENT, "not allowed"),
        "chunk of a file not in the manifest": ([header("a-hostile-02", manifest), chunk("vocab.txt", 0, b"x")], "a",
                                                grpc.StatusCode.INVALID_ARGUMENT, "not in the bundle manifest"),
        "chunk past the declared size": ([header("a-hostile-03", manifest), chunk("config.json", 0, config + b"x")],
                                         "a", grpc.StatusCode.INVALID_ARGUMENT, f"size {size}"),
        "message over the size cap": ([header("a-hostile-04", manifest), chunk("model.safetensors", 0, b"\0" * 7 * MiB)],
                                      "a", grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        "manifest naming another silo": ([header("a-hostile-05", manifest)], "b",
                                         grpc.StatusCode.PERMISSION_DENIED, "only its own"),
        "silo name with a path in it": ([header("a-hostile-06", manifest)], "a/../b",
                                        grpc.StatusCode.UNAUTHENTICATED, "x-crosslm-silo"),
        "a second header": ([header("a-hostile-07", manifest), header("a-hostile-07", manifest)], "a",
                            grpc.StatusCode.INVALID_ARGUMENT, "only the first"),
    }


CASE_NAMES = ["upload id escaping the data dir", "file name escaping the bundle", "chunk of a file not in the manifest",
              "chunk past the declared size", "message over the size cap", "manifest naming another silo",
              "silo name with a path in it", "a second header"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_hostile_upload_is_refused(server, bundle, case):
    folder, manifest = bundle
    messages, silo, code, fragment = cases(manifest, folder)[case]
    got, details = upload(server, messages, silo=silo)
    assert got == code, details
    assert fragment in details
    data = server.service.data_dir
    assert not (data / "bundles").exists() or not any((data / "bundles").iterdir())
    assert not (data.parent / "etc").exists()


def test_nothing_of_another_silo_can_be_downloaded_or_watched(server, bundle):
    from crosslm_client.transport import CrossLMClient, TransportError

    folder, manifest = bundle
    with CrossLMClient(address(server), "a") as a, CrossLMClient(address(server), "b") as b:
        a.upload(folder, manifest, "a-hostile-dl1")
        sub = a.submit("a-hostile-dl1")
        list(a.watch(sub.submission_id))
        result = a.get_submission(sub.submission_id).result
        with pytest.raises(TransportError, match="PERMISSION_DENIED"):
            list(b.watch(sub.submission_id))
        stub = pb_grpc.CrossLMStub(grpc.insecure_channel(address(server)))
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Download(pb.DownloadRequest(submission_id=sub.submission_id, file="config.json"),
                               metadata=(("x-crosslm-silo", "b"),)))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Download(pb.DownloadRequest(submission_id=sub.submission_id, file="../state.db"),
                               metadata=(("x-crosslm-silo", "a"),)))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert result is not None


def test_a_corrupt_chunk_is_refused_but_committed_bytes_stay(server, bundle):
    folder, manifest = bundle
    config = (folder / "config.json").read_bytes()
    bad = pb.UploadRequest(chunk=pb.Chunk(file="crosslm.json", offset=0, data=b"{}", crc32c=crc32c(b"{}") ^ 1))
    code, details = upload(server, [header("a-hostile-08", manifest), chunk("config.json", 0, config), bad])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "CRC" in details
    stub = pb_grpc.CrossLMStub(grpc.insecure_channel(address(server)))
    status = stub.QueryUpload(pb.QueryUploadRequest(upload_id="a-hostile-08"), metadata=(("x-crosslm-silo", "a"),))
    assert {f.name: f.committed for f in status.files}["config.json"] == len(config)
    code, details = upload(server, [header("a-hostile-08", manifest), chunk("config.json", 0, config)])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "already complete" in details
