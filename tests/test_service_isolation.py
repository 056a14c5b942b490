"""Silos that cannot hurt each other (issue 24), over real localhost gRPC with real mTLS certificates.

Silo `h` misbehaves; silos `a` and `b` are well behaved. Each test shows one way `h` used to
break, stall, fill or read the server for everyone, and that it no longer can.
"""
import json
import logging
import shutil
import struct
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file, save_file

from fakes.tiny_slm import new_tiny_slm
from crosslm_client.transport import CrossLMClient, RetryPolicy, TlsFiles, TransportError
from crosslm_shared.bundle import make_manifest
from crosslm_shared.certs import make_certs
from crosslm_shared.errors import BundleError
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2 as pb
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2_grpc as pb_grpc
from crosslm_shared.transfer import iter_chunks
from service_helpers import (LABELS, OPERATOR_TOKEN, chunk, header, http_get, messages, refused, round_trip,
                             start_server, tiny_bundle, tls_server_config)

pytestmark = pytest.mark.hostile
CODE = grpc.StatusCode
SILOS = ["a", "b", "h"]
FAST = RetryPolicy(initial_s=0.05, max_s=0.2, max_attempts=3)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"), server_hosts=["localhost"], silos=SILOS)


def serve(tmp_path, certs, **kw):
    return start_server(tls_server_config(tmp_path / "server", certs.ca.parent, **kw))


def tls(certs, silo) -> TlsFiles:
    cert, key = certs.silos[silo]
    return TlsFiles(ca=certs.ca, cert=cert, key=key)


def channel(server, certs, silo) -> grpc.Channel:
    cert, key = certs.silos[silo]
    creds = grpc.ssl_channel_credentials(certs.ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    return grpc.secure_channel(f"localhost:{server.grpc_port}", creds)


def stub(server, certs, silo):
    return pb_grpc.CrossLMStub(channel(server, certs, silo))


def client(server, certs, silo, **kw) -> CrossLMClient:
    return CrossLMClient(f"localhost:{server.grpc_port}", silo, tls=tls(certs, silo), retry=FAST, **kw)


def bundle_of(root: Path, silo: str, *, seed: int = 0, labels=LABELS, task="rt", edit=None, **manifest_kw):
    folder = new_tiny_slm(labels, seed=seed, tokenizer_dir=root / "tok").save(root / f"slm-{silo}-{seed}")
    if edit is not None:
        edit(folder)
    kw = dict(temperature=1.0, heldout_accuracy=0.5) | manifest_kw
    return folder, make_manifest(folder, task=task, silo=silo, arch="tiny", labels=labels, **kw)


def health_check(server, certs, *, timeout=10.0) -> float:
    """Seconds the gRPC health check took, within `timeout` (raises beyond)."""
    started = time.monotonic()
    reply = health_pb2_grpc.HealthStub(channel(server, certs, "a")).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return time.monotonic() - started


def on_disk(server, upload_id) -> bool:
    data = server.service.data_dir
    return (data / "uploads" / upload_id).exists() or (data / "bundles" / upload_id).exists()


# ---- 1. one silo's SLM must not break or poison the others' rounds --------------------------------
def test_an_slm_scores_others_only_after_its_own_round_succeeded(tmp_path, certs):
    s = serve(tmp_path, certs, engine_options={"fail_silos": ["h"]})
    try:
        with client(s, certs, "h") as h, client(s, certs, "a") as a:
            done, events = round_trip(h, *bundle_of(tmp_path, "h"), "h-admit-0001")
            assert done.stage == "failed"
            assert s.store.peers("rt") == {}
            done, _ = round_trip(a, *bundle_of(tmp_path, "a"), "a-admit-0001")
            assert done.stage == "ready" and done.metrics["peers"] == 1  # h's SLM scored nothing
            assert set(s.store.peers("rt")) == {"a"}
    finally:
        s.stop(grace=1)


def _nan_weights(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    state["classifier.weight"] = torch.full_like(state["classifier.weight"], float("nan"))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _drop_tensor(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    del state["bert.encoder.layer.0.attention.self.query.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _meta(change):
    def edit(folder: Path) -> None:
        meta = json.loads((folder / "crosslm.json").read_text())
        (folder / "crosslm.json").write_text(json.dumps(change(meta)))
    return edit


def _without_meta(m):
    return replace(m, files=tuple(f for f in m.files if f.name != "crosslm.json"))


# name -> (bundle_of keywords, manifest edit, code, fragment of the message)
CONTENT_CASES = {
    "NaN weights": (dict(edit=_nan_weights), None, CODE.INVALID_ARGUMENT, "NaN or Inf"),
    "tensor names do not match the architecture": (dict(edit=_drop_tensor), None, CODE.INVALID_ARGUMENT,
                                                   "does not match the architecture"),
    "three labels on a two-label task": (dict(labels=("neg", "pos", "mixed")), None, CODE.INVALID_ARGUMENT,
                                         "are not task 'rt''s labels"),
    "labels that differ from the task's": (dict(labels=("pos", "neg")), None, CODE.INVALID_ARGUMENT,
                                           "are not task 'rt''s labels"),
    "unknown task": (dict(task="nosuchtask"), None, CODE.INVALID_ARGUMENT, "is not served"),
    "no crosslm.json": (dict(), _without_meta, CODE.INVALID_ARGUMENT, "lacks required file(s) ['crosslm.json']"),
    "crosslm.json is a list": (dict(edit=_meta(lambda m: [m])), None, CODE.INVALID_ARGUMENT,
                               "must hold a JSON object"),
    "crosslm.json temperature 0": (dict(edit=_meta(lambda m: m | {"temperature": 0})), None,
                                   CODE.INVALID_ARGUMENT, "crosslm.json temperature=0"),
    "manifest temperature inf": (dict(), lambda m: replace(m, temperature=float("inf")), CODE.INVALID_ARGUMENT,
                                 "manifest.temperature=inf"),
    "manifest held-out accuracy NaN": (dict(), lambda m: replace(m, heldout_accuracy=float("nan")),
                                       CODE.INVALID_ARGUMENT, "heldout_accuracy=nan"),
}


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory, certs):
    s = serve(tmp_path_factory.mktemp("shared"), certs, max_pending_uploads_per_silo=64, idle_timeout_s=3.0)
    yield s
    s.stop(grace=1)


@pytest.mark.parametrize("case", list(CONTENT_CASES))
def test_bundle_content_the_engine_needs_is_checked_at_upload(shared_server, certs, tmp_path, case):
    bundle_kw, edit_manifest, code, fragment = CONTENT_CASES[case]
    folder, manifest = bundle_of(tmp_path, "h", **bundle_kw)
    manifest = edit_manifest(manifest) if edit_manifest else manifest
    uid = f"h-content-{list(CONTENT_CASES).index(case):03d}"
    got, details = refused(stub(shared_server, certs, "h").Upload, messages(uid, manifest, folder))
    assert got == code, details
    assert fragment in details, details
    assert str(shared_server.service.data_dir) not in details  # no server path in what the silo is told
    assert not on_disk(shared_server, uid)


def test_too_many_labels_are_refused_before_anything_is_stored(shared_server, certs, tmp_path):
    _, manifest = bundle_of(tmp_path, "h")
    big = replace(manifest, labels=tuple(f"l{i}" for i in range(65)))
    got, details = refused(stub(shared_server, certs, "h").Upload, iter([header("h-labels-0001", big)]))
    assert got == CODE.RESOURCE_EXHAUSTED and "cap is 64" in details, details
    assert not on_disk(shared_server, "h-labels-0001")
    with pytest.raises(Exception):
        shared_server.store.get_upload("h-labels-0001")


def test_a_bogus_safetensors_header_length_is_refused_with_the_first_chunk(shared_server, certs, tmp_path):
    folder, manifest = bundle_of(tmp_path, "h")
    size = 8 * 1024 * 1024
    fake = struct.pack("<Q", 17 * 1024 * 1024) + b"\0" * 1016  # claims a 17 MiB header
    manifest = replace(manifest, files=tuple(replace(f, size=size) if f.name == "model.safetensors" else f
                                             for f in manifest.files))
    got, details = refused(stub(shared_server, certs, "h").Upload,
                           iter([header("h-sthead-0001", manifest), chunk("model.safetensors", 0, fake)]))
    assert got == CODE.INVALID_ARGUMENT and "header claims" in details, details
    assert not on_disk(shared_server, "h-sthead-0001")


def test_a_scorer_that_goes_bad_is_dropped_from_a_round_which_goes_on(tmp_path, certs):
    s = serve(tmp_path, certs)
    try:
        with client(s, certs, "h") as h, client(s, certs, "a") as a:
            done, _ = round_trip(h, *bundle_of(tmp_path, "h"), "h-drop-00001")
            assert done.stage == "ready" and set(s.store.peers("rt")) == {"h"}
            _nan_weights(s.service.bundle_dir("h-drop-00001"))  # h's admitted SLM goes bad on the server
            done, events = round_trip(a, *bundle_of(tmp_path, "a", seed=1), "a-drop-00001")
        assert done.stage == "ready" and done.metrics["peers"] == 1
        dropped = [e for e in events if e.kind == "scorer_dropped"]
        assert [e.fields["silo"] for e in dropped] == ["h"] and "non-finite" in dropped[0].fields["reason"]
    finally:
        s.stop(grace=1)


# ---- 2. the LLM changes only by rounds that succeed ----------------------------------------------
class _Recording:
    """An engine that records what the worker asks it to publish or undo."""

    def __init__(self, bad_result_for: str):
        self.bad_result_for, self.calls = bad_result_for, []

    def ready(self):
        return True

    def run_round(self, request, emit):
        from crosslm_server.engines.api import RoundOutcome

        out = Path(request.work_dir) / "out"
        shutil.copytree(request.slm_dir, out, dirs_exist_ok=True)
        if request.silo == self.bad_result_for:
            (out / "config.json").write_text("{not json")  # the result fails validation after the round ran
        return RoundOutcome(out, {"kept": 1})

    def commit(self, request, outcome):
        self.calls.append(("commit", request.silo))
        return {"adapter_version": len([c for c in self.calls if c[0] == "commit"])}

    def discard(self, request):
        self.calls.append(("discard", request.silo))


def test_a_round_that_fails_after_the_engine_ran_publishes_nothing(tmp_path, certs):
    engine = _Recording(bad_result_for="h")
    s = start_server(tls_server_config(tmp_path / "server", certs.ca.parent), engine_factory=lambda: engine)
    try:
        with client(s, certs, "h") as h, client(s, certs, "a") as a:
            failed, _ = round_trip(h, *bundle_of(tmp_path, "h"), "h-publish-01")
            ready, _ = round_trip(a, *bundle_of(tmp_path, "a"), "a-publish-01")
        assert failed.stage == "failed" and ready.stage == "ready"
        assert engine.calls == [("discard", "h"), ("commit", "a")]
        assert ready.metrics["adapter_version"] == 1
        assert not s.service.result_dir(failed.submission_id).exists()
    finally:
        s.stop(grace=1)


# ---- 3. quotas: streams of every kind, the queue, the disk, abandoned uploads --------------------
def _held_open(upload_id, manifest, release: threading.Event):
    yield header(upload_id, manifest)
    release.wait(60)


def test_watch_streams_count_against_the_silo_stream_quota(tmp_path, certs):
    s = serve(tmp_path, certs, max_streams_per_silo=3, max_uploads_per_silo=2, engine_options={"step_seconds": 0.5})
    try:
        with client(s, certs, "h") as h:
            h.upload(*bundle_of(tmp_path, "h"), "h-watch-0001")
            sub = h.submit("h-watch-0001")
        hstub = stub(s, certs, "h")
        watches = [hstub.Watch(pb.WatchRequest(submission_id=sub.submission_id)) for _ in range(3)]
        for w in watches:
            next(w)  # each stream is open and holds a handler thread
        got, details = refused(hstub.Watch, pb.WatchRequest(submission_id=sub.submission_id))
        assert got == CODE.RESOURCE_EXHAUSTED and "max_streams_per_silo=3" in details, details
        assert health_check(s, certs) < 10
        for w in watches:
            w.cancel()
    finally:
        s.stop(grace=1)


def test_one_silos_burst_never_blocks_another_silos_first_submission(tmp_path, certs):
    s = serve(tmp_path, certs, max_queue=2, max_queued_per_silo=2, engine_options={"load_seconds": 3600})
    try:  # the engine never gets ready: everything stays queued
        with client(s, certs, "h") as h, client(s, certs, "a") as a:
            for i in range(2):
                h.upload(*bundle_of(tmp_path, "h", seed=i), f"h-burst-000{i}")
                h.submit(f"h-burst-000{i}")
            h.upload(*bundle_of(tmp_path, "h", seed=2), "h-burst-0002")
            got, details = refused(stub(s, certs, "h").Submit, pb.SubmitRequest(upload_id="h-burst-0002"))
            assert got == CODE.RESOURCE_EXHAUSTED and "max_queued_per_silo=2" in details, details
            a.upload(*bundle_of(tmp_path, "a"), "a-burst-0000")
            assert a.submit("a-burst-0000").stage == "queued"  # the queue is full, but a had nothing waiting
            a.upload(*bundle_of(tmp_path, "a", seed=1), "a-burst-0001")
            got, details = refused(stub(s, certs, "a").Submit, pb.SubmitRequest(upload_id="a-burst-0001"))
            assert got == CODE.RESOURCE_EXHAUSTED and "max_queue" in details, details
    finally:
        s.stop(grace=1)


def test_pending_uploads_and_their_bytes_are_bounded_per_silo(tmp_path, certs):
    folder, manifest = bundle_of(tmp_path, "h")
    s = serve(tmp_path, certs, max_pending_uploads_per_silo=2, max_silo_upload_bytes=int(manifest.total_size * 2.5))
    try:
        hstub = stub(s, certs, "h")
        for i in range(2):
            assert not hstub.Upload(iter([header(f"h-pend-000{i}", manifest)])).complete
        got, details = refused(hstub.Upload, iter([header("h-pend-0002", manifest)]))
        assert got == CODE.RESOURCE_EXHAUSTED and "max_pending_uploads_per_silo=2" in details, details
        assert not hstub.Upload(iter([header("h-pend-0001", manifest)])).complete  # resuming a held one is free
        bigger = replace(manifest, files=tuple(replace(f, size=f.size * 2) if f.name == "model.safetensors" else f
                                               for f in manifest.files))
        s.service.limits = replace(s.service.limits, max_pending_uploads_per_silo=10)
        got, details = refused(hstub.Upload, iter([header("h-pend-0003", bigger)]))
        assert got == CODE.RESOURCE_EXHAUSTED and "max_silo_upload_bytes" in details, details
        with client(s, certs, "a") as a:  # another silo's share is its own
            a.upload(*bundle_of(tmp_path, "a"), "a-pend-0000")
    finally:
        s.stop(grace=1)


def test_abandoned_partial_uploads_expire_files_and_rows(tmp_path, certs):
    folder, manifest = bundle_of(tmp_path, "h")
    s = serve(tmp_path, certs, upload_ttl_s=1.0)
    try:
        hstub = stub(s, certs, "h")
        data = (folder / "config.json").read_bytes()
        assert not hstub.Upload(iter([header("h-ttl-00001", manifest), chunk("config.json", 0, data[:10])])).complete
        assert on_disk(s, "h-ttl-00001")
        deadline = time.monotonic() + 30
        while on_disk(s, "h-ttl-00001") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not on_disk(s, "h-ttl-00001")
        got, _ = refused(hstub.QueryUpload, pb.QueryUploadRequest(upload_id="h-ttl-00001"))
        assert got == CODE.NOT_FOUND
    finally:
        s.stop(grace=1)


def test_only_a_silos_last_rounds_keep_their_files_on_disk(tmp_path, certs):
    s = serve(tmp_path, certs, keep_rounds_per_silo=2)
    try:
        with client(s, certs, "a") as a, client(s, certs, "b") as b:
            subs = [round_trip(a, *bundle_of(tmp_path, "a", seed=i), f"a-keep-000{i}")[0] for i in range(4)]
            other, _ = round_trip(b, *bundle_of(tmp_path, "b"), "b-keep-0000")
            assert [x.stage for x in subs] == ["ready"] * 4
            data = s.service.data_dir
            kept = [(data / "results" / x.submission_id).is_dir() for x in subs]
            assert kept == [False, False, True, True]
            assert [(data / "bundles" / x.upload_id).is_dir() for x in subs] == [False, False, True, True]
            assert (data / "results" / other.submission_id).is_dir()  # b's rounds are b's share
            with pytest.raises(TransportError, match="keep_rounds_per_silo") as e:
                a.download(subs[0].submission_id, subs[0].result, tmp_path / "old")
            assert e.value.code == CODE.NOT_FOUND
            a.download(subs[-1].submission_id, subs[-1].result, tmp_path / "new")
            assert len(a.list_submissions()) == 4  # the history stays listed
    finally:
        s.stop(grace=1)


def test_the_peer_bundle_of_a_silo_outlives_its_kept_rounds(tmp_path, certs):
    s = serve(tmp_path, certs, keep_rounds_per_silo=1, engine_options={"fail_silos": []})
    try:
        with client(s, certs, "a") as a:
            good, _ = round_trip(a, *bundle_of(tmp_path, "a"), "a-peer-0000")
            s.worker.engine.fail_silos = ("a",)  # the next rounds of a fail: good stays its peer
            for i in (1, 2):
                assert round_trip(a, *bundle_of(tmp_path, "a", seed=i), f"a-peer-000{i}")[0].stage == "failed"
            assert s.store.peers("rt") == {"a": good.submission_id}
            assert (s.service.data_dir / "bundles" / good.upload_id).is_dir()
            assert not (s.service.data_dir / "results" / good.submission_id).exists()
    finally:
        s.stop(grace=1)


# ---- 4. idle means idle ----------------------------------------------------------------------------
def _silent(release: threading.Event):
    release.wait(60)
    yield from ()


def _empty_chunks(upload_id, manifest, release: threading.Event):
    yield header(upload_id, manifest)
    while not release.wait(0.2):
        yield chunk("config.json", 0, b"")


@pytest.mark.parametrize("kind", ["no header", "empty chunks"])
def test_a_stream_without_progress_is_cut_after_the_idle_timeout(shared_server, certs, tmp_path, kind, caplog):
    caplog.set_level(logging.INFO)
    _, manifest = bundle_of(tmp_path, "h")
    release = threading.Event()
    stream = _silent(release) if kind == "no header" else _empty_chunks("h-idle-00001", manifest, release)
    try:  # the call's own deadline is far beyond the server's 3 s idle timeout
        got, details = refused(stub(shared_server, certs, "h").Upload, stream, timeout=60)
    finally:
        release.set()
    assert got == CODE.DEADLINE_EXCEEDED and "idle_timeout_s" in details, details
    time.sleep(0.5)  # the handler's own end comes just after the caller's
    ends = [r for r in caplog.records if r.name.startswith("crosslm_server.service.servicer") or r.name.startswith("grpc")]
    assert [r.getMessage() for r in ends if r.levelno >= logging.INFO and "receiving" not in r.getMessage()] \
        == [next(r.getMessage() for r in ends if "no progress" in r.getMessage())]  # one line per cut stream
    assert not any(r.exc_info for r in caplog.records)


def test_the_idle_clock_stops_while_the_server_checks_what_was_sent(tmp_path, certs):
    import admission_checks

    s = serve(tmp_path, certs, idle_timeout_s=1.0)
    try:
        s.service.content_check = admission_checks.sleepy  # 2.5 s in the checker child: the server's turn
        folder, manifest = bundle_of(tmp_path, "h")
        status = stub(s, certs, "h").Upload(messages("h-slowcheck-01", manifest, folder), timeout=60)
        assert status.complete
    finally:
        s.stop(grace=1)


# ---- 5. only regular files inside the SLM folder leave a silo --------------------------------------
def test_a_link_in_the_slm_folder_is_refused_not_followed(tmp_path):
    folder, _ = tiny_bundle(tmp_path)
    secret = tmp_path / "private.csv"
    secret.write_text("text,label\nCANARY-PRIVATE-TEXT,pos\n")
    (folder / "vocab.json").symlink_to(secret)
    with pytest.raises(BundleError, match="symbolic link"):
        make_manifest(folder, task="rt", silo="a", arch="tiny", labels=LABELS)
    (folder / "vocab.json").unlink()
    _, manifest = tiny_bundle(tmp_path / "again")
    swapped = tmp_path / "again" / "slm"
    (swapped / "tokenizer.json").unlink()
    (swapped / "tokenizer.json").symlink_to(secret)  # swapped for a link after the manifest was made
    with pytest.raises(BundleError, match="regular file"):
        list(iter_chunks(swapped / "tokenizer.json"))


# ---- 7. the operators' HTTP view --------------------------------------------------------------------
def test_the_submissions_view_needs_the_operator_token_and_probes_stay_open(shared_server):
    assert http_get(shared_server, "/v1/submissions", token=None)[0] == 401
    assert http_get(shared_server, "/v1/submissions", token="not-the-token-0123456789")[0] == 401
    assert http_get(shared_server, "/v1/submissions", token=OPERATOR_TOKEN)[0] == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert http_get(shared_server, path, token=None)[0] == 200, path


# ---- 8. malformed messages, one log line per dropped stream, reasons without server paths ------------
@pytest.mark.parametrize("method", ["Upload", "Submit", "Watch"])
def test_malformed_messages_are_invalid_argument_without_a_traceback(shared_server, certs, method, caplog):
    ch = channel(shared_server, certs, "h")
    path = f"/crosslm.v1.CrossLM/{method}"
    garbage = b"\xff\xff\xff\xff\x0f"
    with caplog.at_level(logging.INFO):
        if method == "Upload":
            call = ch.stream_unary(path, request_serializer=None, response_deserializer=None)
            got, details = refused(call, iter([garbage]))
        elif method == "Submit":
            got, details = refused(ch.unary_unary(path, request_serializer=None, response_deserializer=None), garbage)
        else:
            got, details = refused(ch.unary_stream(path, request_serializer=None, response_deserializer=None), garbage)
    assert got == CODE.INVALID_ARGUMENT and "malformed" in details, details
    server_records = [r for r in caplog.records if r.name.startswith(("grpc", "crosslm_server"))]
    assert not [r for r in server_records if r.exc_info], [r.getMessage() for r in server_records]


class _Leaky:
    def ready(self):
        return True

    def run_round(self, request, emit):
        raise FileNotFoundError(2, "No such file or directory", str(Path(request.work_dir) / "cache" / "x.bin"))


def test_a_failure_reason_names_no_server_path(tmp_path, certs):
    s = start_server(tls_server_config(tmp_path / "server", certs.ca.parent), engine_factory=_Leaky)
    try:
        with client(s, certs, "a") as a:
            failed, events = round_trip(a, *bundle_of(tmp_path, "a"), "a-leak-00001")
        reason = events[-1].fields["reason"]
        assert failed.stage == "failed" and "FileNotFoundError" in reason
        assert str(tmp_path) not in reason and str(s.service.data_dir) not in failed.error
        assert "Traceback" not in reason
    finally:
        s.stop(grace=1)


# ---- one silo at every quota at once --------------------------------------------------------------
def test_one_silo_at_every_quota_at_once_leaves_the_others_and_health_responsive(tmp_path, certs, capsys):
    """h holds its queue share, its pending uploads and their bytes, and every stream it may open
    (idle uploads and Watch streams); a and b still upload, submit, run rounds and download, and
    the gRPC health check answers, each within deadlines far above their normal latency."""
    folder, manifest = bundle_of(tmp_path, "h")
    s = serve(tmp_path, certs, grpc_workers=16, reserved_workers=4, max_streams_per_silo=4, max_uploads_per_silo=3,
              max_queued_per_silo=2, max_pending_uploads_per_silo=3, max_silo_upload_bytes=3 * manifest.total_size,
              idle_timeout_s=60, engine_options={"step_seconds": 0.5})
    release = threading.Event()
    held = []
    try:
        hstub = stub(s, certs, "h")
        with client(s, certs, "h") as h:  # the queue share: submit until two of its rounds wait
            subs, got = [], None
            for i in range(4):
                h.upload(*bundle_of(tmp_path, "h", seed=10 + i), f"h-all-q{i}")
                if s.store.queued_count("h") >= 2:
                    got, details = refused(hstub.Submit, pb.SubmitRequest(upload_id=f"h-all-q{i}"))
                    break
                subs.append(h.submit(f"h-all-q{i}"))
        assert got == CODE.RESOURCE_EXHAUSTED and "max_queued_per_silo=2" in details, details
        # pending uploads at their count and bytes: the refused one (complete, unsubmitted), two idle streams
        for i in range(2):
            held.append(hstub.Upload.future(_held_open(f"h-all-idle{i}", manifest, release)))
        deadline = time.monotonic() + 30
        while len(s.store.pending_uploads(silo="h")) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        got, details = refused(hstub.Upload, iter([header("h-all-more", manifest)]))
        assert got == CODE.RESOURCE_EXHAUSTED and "max_pending_uploads_per_silo" in details, details
        # every stream it may hold: two idle uploads + two Watch streams on its queued round
        for _ in range(2):
            w = hstub.Watch(pb.WatchRequest(submission_id=subs[-1].submission_id))
            next(w)
            held.append(w)
        got, details = refused(hstub.Watch, pb.WatchRequest(submission_id=subs[-1].submission_id))
        assert got == CODE.RESOURCE_EXHAUSTED and "max_streams_per_silo=4" in details, details

        latencies, stop = [], threading.Event()

        def probe():
            while not stop.wait(0.2):
                latencies.append(health_check(s, certs, timeout=10))

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        outcomes, timings = {}, {}

        def well_behaved(name: str) -> None:
            started = time.monotonic()
            with client(s, certs, name) as c:
                done, _ = round_trip(c, *bundle_of(tmp_path, name), f"{name}-all-0001")
                back = c.download(done.submission_id, done.result, tmp_path / f"{name}-back")
            outcomes[name], timings[name] = (done.stage, back.is_dir()), time.monotonic() - started

        others = [threading.Thread(target=well_behaved, args=(n,)) for n in ("a", "b")]
        for t in others:
            t.start()
        for t in others:
            t.join(120)  # generous: h's two rounds (a few seconds each) run first
        stop.set()
        prober.join(15)
        assert outcomes == {"a": ("ready", True), "b": ("ready", True)}, outcomes
        assert latencies and max(latencies) < 10
        with capsys.disabled():
            print(f"\n[every quota at once] health checks: {len(latencies)}, median "
                  f"{sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms; "
                  f"round trips a {timings['a']:.1f} s, b {timings['b']:.1f} s (behind h's two rounds)")
    finally:
        release.set()
        for call in held:
            call.cancel()
        s.stop(grace=1)
