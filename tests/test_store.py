"""Store contract, written once and run on memory, SQLite :memory:, SQLite on a file and PostgreSQL
(a real server the session starts: tests/pg_server.py)."""
import json
import sqlite3

import pytest

from crosslm_shared.bundle import FileEntry, Manifest
from crosslm_shared.errors import NotFoundError, PermissionDeniedError, PreconditionError
from crosslm_shared.errors import RecordValueError
from crosslm_shared.records import EventKind, Stage, Upload
from crosslm_server.service.store import MemoryStore
from crosslm_shared.errors import UploadConflictError
from crosslm_server.service.store.sqlite import SQLiteStore

SHA = "0" * 64


def manifest(task="rt", silo="a", sha=SHA):
    return Manifest(task=task, silo=silo, arch="tiny", labels=("neg", "pos"),
                    files=(FileEntry("config.json", 10, sha), FileEntry("model.safetensors", 20, sha)))


@pytest.fixture(params=["memory", "sqlite-memory", "sqlite-file", "postgres"])
def store(request, tmp_path):
    s = {"memory": MemoryStore, "sqlite-memory": lambda: SQLiteStore(":memory:"),
         "sqlite-file": lambda: SQLiteStore(tmp_path / "state.db"),
         "postgres": lambda: _postgres(request.getfixturevalue("pg_dsn"))}[request.param]()
    yield s
    s.close()


def _postgres(dsn):
    from crosslm_server.service.store.postgres import PostgresStore

    return PostgresStore(dsn, pool_size=2)


def submitted(store, uid, *, silo="a", task="rt", now=1.0):
    store.put_upload(Upload(uid, silo, manifest(task, silo)))
    store.mark_upload_complete(uid)
    sub, _ = store.submit(uid, submission_id="s-" + uid, now=now)
    return sub


def test_put_upload_is_idempotent_and_refuses_a_changed_manifest(store):
    up = Upload("up-00001", "a", manifest())
    assert store.put_upload(up) == up
    assert store.put_upload(up) == up
    with pytest.raises(UploadConflictError):
        store.put_upload(Upload("up-00001", "a", manifest(sha="1" * 64)))
    with pytest.raises(PermissionDeniedError):
        store.put_upload(Upload("up-00001", "b", manifest()))
    assert store.get_upload("up-00001").complete is False
    assert store.mark_upload_complete("up-00001").complete is True
    store.delete_upload("up-00001")
    with pytest.raises(NotFoundError):
        store.get_upload("up-00001")


def test_submit_needs_a_complete_upload_and_is_idempotent(store):
    store.put_upload(Upload("up-00001", "a", manifest()))
    with pytest.raises(PreconditionError):
        store.submit("up-00001", submission_id="s1", now=1.0)
    with pytest.raises(NotFoundError):
        store.submit("nope-0000", submission_id="s2", now=1.0)
    store.mark_upload_complete("up-00001")
    sub, created = store.submit("up-00001", submission_id="s1", now=1.0)
    assert created and sub.stage == "queued" and sub.silo == "a" and sub.task == "rt"
    again, created = store.submit("up-00001", submission_id="s3", now=2.0)
    assert not created and again.submission_id == "s1"


def test_claim_runs_oldest_first_and_tracks_queue(store):
    for i in range(3):
        submitted(store, f"up-0000{i}", now=float(i))
    assert store.queue_depth() == 3
    assert [store.queue_position(f"s-up-0000{i}") for i in range(3)] == [1, 2, 3]
    assert store.queued() == ["s-up-00000", "s-up-00001", "s-up-00002"]
    first = store.claim_next(now=5.0)
    assert first.submission_id == "s-up-00000" and first.stage == "running"
    assert store.queue_position("s-up-00000") == 0
    assert store.queue_position("s-up-00002") == 2
    assert store.queued() == ["s-up-00001", "s-up-00002"]
    assert store.requeue_running(now=6.0) == ["s-up-00000"]
    assert store.claim_next(now=7.0).submission_id == "s-up-00000"
    done = store.finish("s-up-00000", result=manifest(), metrics={"acc": "0.5"}, now=8.0)
    assert done.stage == "ready" and done.result == manifest() and done.metrics["acc"] == "0.5"
    assert store.claim_next(now=9.0).submission_id == "s-up-00001"
    failed = store.fail("s-up-00001", error="boom", now=10.0)
    assert failed.stage == "failed" and failed.error == "boom"
    assert store.claim_next(now=11.0).submission_id == "s-up-00002"
    assert store.claim_next(now=12.0) is None


def test_events_have_per_submission_sequence_numbers(store):
    submitted(store, "up-00001")
    submitted(store, "up-00002")
    for kind in ("queued", "generating", "ready"):
        store.append_event("s-up-00001", kind, {"k": kind}, now=1.0)
    store.append_event("s-up-00002", "queued", {}, now=1.0)
    events = store.events_after("s-up-00001", 0)
    assert [(e.seq, e.kind) for e in events] == [(1, "queued"), (2, "generating"), (3, "ready")]
    assert events[0].fields == {"k": "queued"}
    assert [e.seq for e in store.events_after("s-up-00001", 2)] == [3]
    assert [e.seq for e in store.events_after("s-up-00002", 0)] == [1]
    with pytest.raises(NotFoundError):
        store.events_after("missing", 0)


def test_list_and_peers_keep_latest_per_silo_and_task(store):
    submitted(store, "up-a0001", silo="a")
    submitted(store, "up-b0001", silo="b")
    submitted(store, "up-a0002", silo="a")
    submitted(store, "up-c0001", silo="c", task="spam")
    assert [s.submission_id for s in store.list_submissions(silo="a")] == ["s-up-a0001", "s-up-a0002"]
    assert len(store.list_submissions()) == 4
    assert store.peers("rt") == {}  # submitted is not admitted: only a round that succeeded makes a peer
    for _ in range(4):
        sub = store.claim_next(now=2.0)
        if sub.upload_id == "up-b0001":
            store.fail(sub.submission_id, error="x", now=3.0)
        else:
            store.finish(sub.submission_id, result=sub_manifest(store, sub), metrics={}, now=3.0)
    assert store.peers("rt") == {"a": "s-up-a0002"}  # b's round failed: b scores nobody's round
    assert store.peers("spam") == {"c": "s-up-c0001"}
    store.check_writable()


def sub_manifest(store, sub):
    return store.get_upload(sub.upload_id).manifest


def test_pending_uploads_and_queued_counts_per_silo(store):
    store.put_upload(Upload("up-a0001", "a", manifest(), created_at=1.0))
    submitted(store, "up-a0002", silo="a")
    submitted(store, "up-b0001", silo="b")
    store.put_upload(Upload("up-b0002", "b", manifest(silo="b"), complete=True, created_at=5.0))
    assert [u.upload_id for u in store.pending_uploads(silo="a")] == ["up-a0001"]
    assert [u.upload_id for u in store.pending_uploads()] == ["up-a0001", "up-b0002"]
    assert store.queued_count("a") == 1 and store.queued_count("b") == 1 and store.queued_count("c") == 0
    store.claim_next(now=6.0)
    assert store.queued_count("a") == 0


def test_sqlite_state_survives_reopen(tmp_path):
    s = SQLiteStore(tmp_path / "state.db")
    submitted(s, "up-00001")
    s.claim_next(now=2.0)
    s.append_event("s-up-00001", "started", {}, now=2.0)
    s.close()
    s = SQLiteStore(tmp_path / "state.db")
    assert s.get_submission("s-up-00001").stage == "running"
    assert s.requeue_running(now=3.0) == ["s-up-00001"]
    assert s.append_event("s-up-00001", "queued", {}, now=3.0).seq == 2
    s.close()


TYPED = {"kl": 0.1 + 0.2, "losses": (1 / 3, 1e-300), "kept": 2**62 + 1, "updated": False, "hist": (0, 3),
         "labels": ("neg", "pos"), "none": (), "note": "x", "nan": float("nan")}


def assert_same_typed(got, want):
    assert set(got) == set(want)
    for key, value in want.items():
        if value != value:  # NaN
            assert got[key] != got[key], key
        else:
            assert got[key] == value and type(got[key]) is type(value), (key, got[key])


def test_metrics_and_event_fields_come_back_typed(store):
    submitted(store, "up-00001")
    store.claim_next(now=2.0)
    store.append_event("s-up-00001", EventKind.TRAINING_LLM, TYPED, now=3.0)
    store.finish("s-up-00001", result=manifest(), metrics=TYPED, now=4.0)
    assert_same_typed(store.get_submission("s-up-00001").metrics, TYPED)
    assert_same_typed(store.list_submissions()[0].metrics, TYPED)
    (event,) = store.events_after("s-up-00001", 0)
    assert event.kind is EventKind.TRAINING_LLM
    assert_same_typed(event.fields, TYPED)
    assert store.get_submission("s-up-00001").stage is Stage.READY


def test_a_metric_the_wire_cannot_carry_is_refused_and_nothing_is_stored(store):
    submitted(store, "up-00001")
    store.claim_next(now=2.0)
    with pytest.raises(RecordValueError, match="'bad'"):
        store.finish("s-up-00001", result=manifest(), metrics={"bad": {"a": 1}}, now=3.0)
    assert store.get_submission("s-up-00001").stage is Stage.RUNNING and store.peers("rt") == {}
    with pytest.raises(RecordValueError, match="'bad'"):
        store.append_event("s-up-00001", EventKind.SCORING, {"bad": [1, "a"]}, now=3.0)
    assert store.events_after("s-up-00001", 0) == []


def test_a_data_dir_from_before_typed_values_reads_back_its_strings(tmp_path):
    """Servers before typed values stored metrics and fields as JSON objects of strings: an upgraded
    server reads them as those strings (no schema change, nothing parsed)."""
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    submitted(store, "up-00001")
    store.close()
    with sqlite3.connect(path) as db:  # the rows an old server wrote for a finished round
        db.execute("UPDATE submissions SET stage = 'ready', metrics = :m", {"m": json.dumps({"kl": "0.123457"})})
        db.execute("INSERT INTO events (submission_id, seq, kind, time, fields) VALUES ('s-up-00001', 1, "
                   "'generating', 1.0, :f)", {"f": json.dumps({"k": "5", "n": "10"})})
    store = SQLiteStore(path)
    sub = store.get_submission("s-up-00001")
    assert sub.stage is Stage.READY and dict(sub.metrics) == {"kl": "0.123457"}
    (event,) = store.events_after("s-up-00001", 0)
    assert event.kind is EventKind.GENERATING and dict(event.fields) == {"k": "5", "n": "10"}
    store.close()
