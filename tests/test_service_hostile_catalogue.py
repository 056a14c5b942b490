"""The hostile-input catalogue over real gRPC (issue 7), on top of test_service_hostile.py.

Every case asserts the status code, a message fragment that tells the sender what to fix,
that nothing of the upload is left on disk (beyond bytes committed before the bad chunk,
which are kept on purpose so a resume can continue), and that the server is still ready.
"""
import json
import shutil
import struct
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crosslm_shared.bundle import FileEntry, make_manifest
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2 as pb
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2_grpc as pb_grpc
from service_helpers import LABELS, address, chunk, header, messages, refused, server_config, start_server, tiny_bundle

pytestmark = pytest.mark.hostile
MiB = 1024 * 1024
CODE = grpc.StatusCode
IDLE_S = 4.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(server_config(tmp_path_factory.mktemp("server"), max_bundle_bytes=64 * MiB,
                                   idle_timeout_s=IDLE_S, max_uploads_per_silo=2, max_pending_uploads_per_silo=64))
    yield s
    s.stop(grace=1)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("silo"))


@pytest.fixture(scope="module")
def stub(server):
    return pb_grpc.CrossLMStub(grpc.insecure_channel(address(server)))


@pytest.fixture(scope="module")
def done(server, stub, bundle):
    """A complete upload and a ready submission of silo a."""
    folder, manifest = bundle
    status = stub.Upload(iter(messages("a-cat-done-0", manifest, folder)), metadata=silo("a"))
    assert status.complete
    sub = stub.Submit(pb.SubmitRequest(upload_id="a-cat-done-0"), metadata=silo("a"))
    for event in stub.Watch(pb.WatchRequest(submission_id=sub.submission_id), metadata=silo("a")):
        if event.kind in ("ready", "failed"):
            break
    return sub.submission_id


def silo(name):
    return (("x-crosslm-silo", name),)


def variant(tmp_path, bundle, *, config=None, safetensors: bytes | None = None, labels=LABELS, drop=()):
    """A copy of the tiny bundle with config.json edited or model.safetensors replaced; fresh manifest."""
    folder, _ = bundle
    out = tmp_path / "variant"
    shutil.copytree(folder, out)
    if config is not None:
        cfg = json.loads((out / "config.json").read_text())
        cfg = config(cfg) or cfg
        (out / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    if safetensors is not None:
        (out / "model.safetensors").write_bytes(safetensors)
    for name in drop:
        (out / name).unlink()
    return out, make_manifest(out, task="rt", silo="a", arch="tiny", labels=labels, temperature=1.0,
                              heldout_accuracy=0.5)


def safetensors(header: dict, body: bytes = b"\0" * 8, *, claimed: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + body


def with_file(manifest, name, size=10, sha="0" * 64):
    return replace(manifest, files=manifest.files + (FileEntry(name, size, sha),))


# ---- the catalogue -------------------------------------------------------------------------------
# name -> (build(ctx) -> (messages, silo metadata), code, fragment of the message, bytes kept for resume)
def upload_cases():
    def full(uid, mutate=None):
        def build(c):
            folder, manifest = variant(c.tmp, c.bundle, **mutate) if mutate else c.bundle
            return messages(uid, manifest, folder), silo("a")
        return build

    def manifest_only(uid, edit, who="a"):
        return lambda c: ([header(uid, edit(c.bundle[1]))], silo(who))

    def first_chunks(uid, make):
        def build(c):
            folder, manifest = c.bundle
            data = (folder / "config.json").read_bytes()
            return [header(uid, manifest), *make(data)], silo("a")
        return build

    bad_sha = lambda m: replace(m, files=tuple(replace(f, sha256="ab" * 32) if f.name == "config.json" else f
                                                for f in m.files))
    big = lambda m: replace(m, files=tuple(replace(f, size=65 * MiB) if f.name == "model.safetensors" else f
                                           for f in m.files))
    return {
        "SHA-256 mismatch": (lambda c: (messages("a-cat-sha-01", bad_sha(c.bundle[1]), c.bundle[0]), silo("a")),
                             CODE.INVALID_ARGUMENT, "does not match", 0),
        "chunk offset gap": (first_chunks("a-cat-gap-01", lambda d: [chunk("config.json", 10, d[10:40])]),
                             CODE.FAILED_PRECONDITION, "resume from 0", 0),
        "chunk offset overlap": (first_chunks("a-cat-ovl-01", lambda d: [chunk("config.json", 0, d[:100]),
                                                                          chunk("config.json", 50, d[50:150])]),
                                 CODE.FAILED_PRECONDITION, "resume from 100", 100),
        "chunk offset negative (-1 as uint64)": (
            first_chunks("a-cat-neg-01", lambda d: [chunk("config.json", 2**64 - 1, d[:10])]),
            CODE.FAILED_PRECONDITION, "resume from 0", 0),
        "absolute file name": (manifest_only("a-cat-abs-01", lambda m: with_file(m, "/etc/passwd")),
                               CODE.INVALID_ARGUMENT, "not allowed", 0),
        "file name with NUL": (manifest_only("a-cat-nul-01", lambda m: with_file(m, "vocab.txt\0.py")),
                               CODE.INVALID_ARGUMENT, "not allowed", 0),
        "file name not in the allow-list": (manifest_only("a-cat-evl-01", lambda m: with_file(m, "modeling_evil.py")),
                                            CODE.INVALID_ARGUMENT, "allowed:", 0),
        "pickle pytorch_model.bin": (manifest_only("a-cat-pkl-01", lambda m: with_file(m, "pytorch_model.bin")),
                                     CODE.INVALID_ARGUMENT, "no pickled", 0),
        "pickle model.pt": (manifest_only("a-cat-pkl-02", lambda m: with_file(m, "model.pt")),
                            CODE.INVALID_ARGUMENT, "no pickled", 0),
        "pickle model.pkl": (manifest_only("a-cat-pkl-03", lambda m: with_file(m, "model.pkl")),
                             CODE.INVALID_ARGUMENT, "no pickled", 0),
        "duplicate file in the manifest": (manifest_only("a-cat-dup-01", lambda m: replace(m, files=m.files + m.files[:1])),
                                           CODE.INVALID_ARGUMENT, "twice", 0),
        "required file missing": (manifest_only("a-cat-req-01", lambda m: replace(
            m, files=tuple(f for f in m.files if f.name != "model.safetensors"))), CODE.INVALID_ARGUMENT, "lacks", 0),
        "temperature zero": (manifest_only("a-cat-tmp-01", lambda m: replace(m, temperature=0.0)),
                             CODE.INVALID_ARGUMENT, "temperature", 0),
        "one label only": (manifest_only("a-cat-lbl-01", lambda m: replace(m, labels=("pos",))),
                           CODE.INVALID_ARGUMENT, "at least two", 0),
        "bundle over the size cap": (manifest_only("a-cat-big-01", big), CODE.RESOURCE_EXHAUSTED, "exceeds", 0),
        "manifest too big for one message": (manifest_only("a-cat-man-01", lambda m: replace(
            m, labels=tuple(f"label{i:07d}" for i in range(500_000)))), CODE.RESOURCE_EXHAUSTED, "larger than max", 0),
        "upload id too short": (manifest_only("x", lambda m: m), CODE.INVALID_ARGUMENT, "8-128", 0),
        "no silo name (dev mode)": (lambda c: ([header("a-cat-ano-01", c.bundle[1])], ()),
                                    CODE.UNAUTHENTICATED, "x-crosslm-silo", 0),
        "chunk before the header": (lambda c: ([chunk("config.json", 0, b"{}")], silo("a")),
                                    CODE.INVALID_ARGUMENT, "must be an UploadHeader", 0),
        "empty stream": (lambda c: ([], silo("a")), CODE.INVALID_ARGUMENT, "must be an UploadHeader", 0),
        "safetensors header over the cap": (full("a-cat-st1-01", {"safetensors": safetensors({}, claimed=17 * MiB)}),
                                            CODE.INVALID_ARGUMENT, "cap", 0),
        "safetensors offsets beyond the file": (full("a-cat-st2-01", {"safetensors": safetensors(
            {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4096]}})}), CODE.INVALID_ARGUMENT, "outside", 0),
        "safetensors disallowed dtype": (full("a-cat-st3-01", {"safetensors": safetensors(
            {"w": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}})}), CODE.INVALID_ARGUMENT, "dtype 'F64'", 0),
        "truncated safetensors (shorter than its header)": (full("a-cat-st4-01", {"safetensors": b"\x10\0\0"}),
                                                            CODE.INVALID_ARGUMENT, "shorter", 0),
        "config.json with auto_map": (full("a-cat-cf1-01", {"config": lambda c: c | {"auto_map": {
            "AutoModel": "evil.Model"}}}), CODE.INVALID_ARGUMENT, "remote code is never run", 0),
        "config.json unknown model_type": (full("a-cat-cf2-01", {"config": lambda c: c | {"model_type": "gpt2"}}),
                                           CODE.INVALID_ARGUMENT, "allowed: ['bert', 'mpnet']", 0),
        "config.json not JSON": (full("a-cat-cf3-01", {"config": lambda c: "{not json"}),
                                 CODE.INVALID_ARGUMENT, "not valid JSON", 0),
        # refused at the header now: the labels are not the served task's (issue 24)
        "label count does not match": (full("a-cat-lb1-01", {"labels": ("neg", "pos", "mixed")}),
                                       CODE.INVALID_ARGUMENT, "are not task 'rt''s labels", 0),
        "label names do not match": (full("a-cat-lb2-01", {"labels": ("bad", "good")}),
                                     CODE.INVALID_ARGUMENT, "are not task 'rt''s labels", 0),
    }


UPLOAD_CASES = list(upload_cases())


class Ctx:
    def __init__(self, tmp, bundle):
        self.tmp, self.bundle = tmp, bundle


def upload_id_of(msgs) -> str:
    first = msgs[0] if msgs else None
    return first.header.upload_id if first is not None and first.WhichOneof("kind") == "header" else ""


def assert_clean(server, upload_id: str, *, kept: int = 0) -> None:
    """No bundle, no bytes but those kept for a resume, nothing outside data_dir, still ready."""
    data = server.service.data_dir
    if upload_id:
        assert not (data / "bundles" / upload_id).exists()
        folder = data / "uploads" / upload_id
        held = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
        assert held == kept, f"{held} bytes left in {folder}"
    assert not (data.parent / "etc").exists()
    assert_ready(server)


def assert_ready(server) -> None:
    assert server.readiness()[0], server.readiness()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address(server)))
    deadline = time.monotonic() + 10  # the health status follows readiness every 0.5 s
    while True:
        reply = health.Check(health_pb2.HealthCheckRequest(service="crosslm.v1.CrossLM"), timeout=10)
        if reply.status == health_pb2.HealthCheckResponse.SERVING or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("case", UPLOAD_CASES)
def test_hostile_upload(server, stub, bundle, tmp_path, case):
    build, code, fragment, kept = upload_cases()[case]
    msgs, metadata = build(Ctx(tmp_path, bundle))
    msgs = list(msgs)
    got, details = refused(stub.Upload, iter(msgs), metadata=metadata)
    assert got == code, details
    assert fragment in details, details
    assert_clean(server, upload_id_of(msgs), kept=kept)


def test_truncated_upload_is_held_incomplete_and_cannot_be_submitted(server, stub, bundle):
    folder, manifest = bundle
    data = (folder / "config.json").read_bytes()
    status = stub.Upload(iter([header("a-cat-trn-01", manifest), chunk("config.json", 0, data[:-1])]),
                         metadata=silo("a"))
    assert not status.complete
    code, details = refused(stub.Submit, pb.SubmitRequest(upload_id="a-cat-trn-01"), metadata=silo("a"))
    assert code == CODE.FAILED_PRECONDITION and "send the remaining bytes" in details
    assert_clean(server, "a-cat-trn-01", kept=len(data) - 1)  # committed bytes wait for the resume


def test_reused_upload_id_with_another_manifest(server, stub, bundle, done):
    folder, manifest = bundle
    other = replace(manifest, heldout_accuracy=0.9)
    code, details = refused(stub.Upload, iter([header("a-cat-done-0", other)]), metadata=silo("a"))
    assert code == CODE.ALREADY_EXISTS and "choose a new upload id" in details
    assert (server.service.data_dir / "bundles" / "a-cat-done-0").is_dir()  # the first one is untouched
    assert_ready(server)


def other_rpcs():
    unknown = "sub-doesnotexist00000000"
    return {
        "unknown submission: GetSubmission": (lambda s, d: refused(
            s.GetSubmission, pb.GetSubmissionRequest(submission_id=unknown), metadata=silo("a")), CODE.NOT_FOUND),
        "unknown submission: Watch": (lambda s, d: refused(
            s.Watch, pb.WatchRequest(submission_id=unknown), metadata=silo("a")), CODE.NOT_FOUND),
        "unknown submission: Download": (lambda s, d: refused(
            s.Download, pb.DownloadRequest(submission_id=unknown, file="config.json"), metadata=silo("a")),
            CODE.NOT_FOUND),
        "unknown upload: Submit": (lambda s, d: refused(
            s.Submit, pb.SubmitRequest(upload_id="a-cat-nothere"), metadata=silo("a")), CODE.NOT_FOUND),
        "unknown upload: QueryUpload": (lambda s, d: refused(
            s.QueryUpload, pb.QueryUploadRequest(upload_id="a-cat-nothere"), metadata=silo("a")), CODE.NOT_FOUND),
        "another silo's submission: GetSubmission": (lambda s, d: refused(
            s.GetSubmission, pb.GetSubmissionRequest(submission_id=d), metadata=silo("b")), CODE.PERMISSION_DENIED),
        "another silo's upload: QueryUpload": (lambda s, d: refused(
            s.QueryUpload, pb.QueryUploadRequest(upload_id="a-cat-done-0"), metadata=silo("b")),
            CODE.PERMISSION_DENIED),
        "another silo's upload: Submit": (lambda s, d: refused(
            s.Submit, pb.SubmitRequest(upload_id="a-cat-done-0"), metadata=silo("b")), CODE.PERMISSION_DENIED),
        "download offset beyond the file": (lambda s, d: refused(
            s.Download, pb.DownloadRequest(submission_id=d, file="config.json", offset=2**40), metadata=silo("a")),
            CODE.INVALID_ARGUMENT),
        "download of a file not in the result": (lambda s, d: refused(
            s.Download, pb.DownloadRequest(submission_id=d, file="model.pkl"), metadata=silo("a")),
            CODE.INVALID_ARGUMENT),
    }


@pytest.mark.parametrize("case", list(other_rpcs()))
def test_hostile_request(server, stub, done, case):
    call, code = other_rpcs()[case]
    got, details = call(stub, done)
    assert got == code, details
    assert len(details) > 20 and ("'" in details or "silo" in details), details  # names the bad id / value
    assert not any((server.service.data_dir / "bundles").glob("b-*"))
    assert_ready(server)


def _held_open(upload_id, manifest, release: threading.Event):
    yield header(upload_id, manifest)
    release.wait(30)


def test_too_many_concurrent_uploads_from_one_silo(server, stub, bundle):
    _, manifest = bundle
    manifest = replace(manifest, silo="c")
    release = threading.Event()
    gauge = server.metrics.active_transfers.labels("upload")
    before = gauge._value.get()
    calls = [stub.Upload.future(_held_open(f"c-cat-conc-{i}", manifest, release), metadata=silo("c"))
             for i in range(2)]
    try:
        deadline = time.monotonic() + IDLE_S / 2
        while gauge._value.get() < before + 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        code, details = refused(stub.Upload, iter([header("c-cat-conc-9", manifest)]), metadata=silo("c"))
        assert code == CODE.RESOURCE_EXHAUSTED and "max_uploads_per_silo=2" in details
        other = stub.Upload(iter([header("a-cat-conc-0", bundle[1])]), metadata=silo("a"))
        assert not other.complete  # another silo is not held up by c
    finally:
        release.set()
        for call in calls:
            call.result(timeout=30)
    assert_clean(server, "c-cat-conc-9")
    assert_clean(server, "c-cat-conc-0")


def test_an_idle_upload_is_cut(server, stub, bundle):
    _, manifest = bundle
    release = threading.Event()
    started = time.monotonic()
    try:
        code, details = refused(stub.Upload, _held_open("a-cat-idle-01", manifest, release), metadata=silo("a"))
    finally:
        release.set()
    assert code == CODE.DEADLINE_EXCEEDED and "idle_timeout_s" in details and "resume" in details, details
    assert IDLE_S - 0.5 <= time.monotonic() - started < IDLE_S + 20
    assert_clean(server, "a-cat-idle-01")


# ---- a silo's own data: bad lines are named by file and line ------------------------------------
@pytest.mark.parametrize("name, content, fragment", [
    ("data.csv", "text,label\ngood film,pos\nbad film,neg\nok,pos\nmeh,neg\n,pos\n", "data.csv:6: missing or empty 'text'"),
    ("data.csv", "text,label\ngood film,pos\nbad film,neg\nok,pos\nmeh,maybe\n", "data.csv:5: label 'maybe'"),
    ("data.jsonl", '{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"\n', "data.jsonl:2: not valid JSON"),
    ("data.jsonl", '{"text": "good", "label": "pos"}\n["bad", "neg"]\n', "data.jsonl:2: expected a JSON object"),
])
def test_bad_lines_in_a_silos_data(tmp_path, name, content, fragment):
    from crosslm_shared.data import read_labelled
    from crosslm_shared.errors import DataError

    path: Path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as e:
        read_labelled(path, labels=LABELS)
    assert fragment in str(e.value)
