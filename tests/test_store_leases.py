"""The LeaseStore contract, on memory and on a real PostgreSQL: leases, fencing, the dead-letter
state, one running round per task, adapter versions by compare-and-swap; on PostgreSQL also the
database's own refusal of a second running round of a task and concurrent claims over connections."""
import threading
import time
from dataclasses import replace

import pytest

from crosslm_shared.errors import AdapterConflictError, LeaseLostError
from test_store import manifest, submitted


@pytest.fixture(params=["memory", "postgres"])
def store(request):
    from crosslm_server.service.store import MemoryStore

    if request.param == "memory":
        yield MemoryStore()
        return
    from crosslm_server.service.store.postgres import PostgresStore

    s = PostgresStore(request.getfixturevalue("pg_dsn"), pool_size=4)
    yield s
    s.close()


@pytest.fixture
def pg_store(pg_dsn):
    from crosslm_server.service.store.postgres import PostgresStore

    s = PostgresStore(pg_dsn, pool_size=4)
    yield s
    s.close()


def test_a_claim_carries_a_token_and_heartbeats_keep_it(store):
    submitted(store, "up-00001")
    lease = store.claim(worker="w1", lease_s=10.0, now=100.0)
    assert (lease.submission.submission_id, lease.worker, lease.attempt, lease.until) == ("s-up-00001", "w1", 1, 110.0)
    assert store.get_submission("s-up-00001").stage == "running"
    assert store.claim(worker="w2", lease_s=10.0, now=100.0) is None
    assert store.heartbeat(lease, lease_s=10.0, now=108.0).until == 118.0
    assert store.reap_expired(now=115.0, max_attempts=3) == ([], [])  # the heartbeat moved the end


def test_an_expired_lease_goes_back_to_the_queue_then_to_the_dead_letter_state(store):
    submitted(store, "up-00001")
    tokens = []
    for attempt in (1, 2):
        lease = store.claim(worker=f"w{attempt}", lease_s=5.0, now=10.0 * attempt)
        assert lease.attempt == attempt
        tokens.append(lease.token)
        assert store.reap_expired(now=10.0 * attempt + 6, max_attempts=3) == (["s-up-00001"], [])
        assert store.get_submission("s-up-00001").stage == "queued"
    assert tokens[0] != tokens[1]
    store.claim(worker="w3", lease_s=5.0, now=30.0)
    assert store.reap_expired(now=36.0, max_attempts=3) == ([], ["s-up-00001"])
    sub = store.get_submission("s-up-00001")
    assert sub.stage == "failed" and "lost 3 times" in sub.error and "dead-lettered" in sub.error
    kinds = [(e.kind, dict(e.fields)) for e in store.events_after("s-up-00001", 0)]
    assert kinds[:2] == [("queued", {"position": 1, "rerun": True})] * 2
    assert kinds[2][0] == "failed" and "dead-lettered" in kinds[2][1]["reason"]
    assert store.claim(worker="w4", lease_s=5.0, now=40.0) is None


def test_a_worker_whose_lease_was_taken_over_cannot_heartbeat_publish_or_fail(store):
    submitted(store, "up-00001")
    old = store.claim(worker="w1", lease_s=5.0, now=0.0)
    store.reap_expired(now=6.0, max_attempts=3)
    new = store.claim(worker="w2", lease_s=5.0, now=7.0)
    result = manifest()
    for call in (lambda: store.heartbeat(old, lease_s=5.0, now=8.0),
                 lambda: store.finish_leased(old, result=result, metrics={}, now=8.0, adapter_uri="file:///a/v1",
                                             ready_fields={}),
                 lambda: store.fail_leased(old, error="x", now=8.0),
                 ):
        with pytest.raises(LeaseLostError, match="lost its lease"):
            call()
    assert store.release(old, now=8.0) is False
    assert store.get_submission("s-up-00001").stage == "running"
    assert store.adapter_versions("rt") == [] and store.peers("rt") == {}
    sub, event = store.finish_leased(new, result=result, metrics={"k": "v"}, now=9.0, adapter_uri="file:///a/v1",
                                     ready_fields={"files": "2"})
    assert sub.stage == "ready" and event.kind == "ready" and event.seq == len(store.events_after(sub.submission_id, 0))
    assert [(a.version, a.submission_id) for a in store.adapter_versions("rt")] == [(1, "s-up-00001")]
    assert store.peers("rt") == {"a": "s-up-00001"}


def test_one_running_round_per_task(store):
    for uid, task in (("up-00001", "rt"), ("up-00002", "rt"), ("up-00003", "spam")):
        submitted(store, uid, task=task)
    first = store.claim(worker="w1", lease_s=60.0, now=1.0)
    second = store.claim(worker="w2", lease_s=60.0, now=1.0)
    assert (first.submission.task, second.submission.task) == ("rt", "spam")  # the second rt round waits
    assert store.claim(worker="w3", lease_s=60.0, now=1.0) is None
    store.finish_leased(first, result=manifest(), metrics={}, now=2.0, adapter_uri=None, ready_fields={})
    assert store.claim(worker="w3", lease_s=60.0, now=3.0).submission.submission_id == "s-up-00002"


def test_the_database_itself_refuses_a_second_running_round_of_a_task(pg_store):
    import psycopg

    store = pg_store
    submitted(store, "up-00001")
    submitted(store, "up-00002")
    store.claim(worker="w1", lease_s=60.0, now=1.0)
    with psycopg.connect(store.dsn) as conn, pytest.raises(psycopg.errors.UniqueViolation):  # whatever the code does
        conn.execute("UPDATE submissions SET stage = 'running' WHERE submission_id = %(id)s", {"id": "s-up-00002"})


def test_adapter_versions_are_published_by_compare_and_swap(store):
    submitted(store, "up-00001")
    submitted(store, "up-00002")
    a = store.claim(worker="w1", lease_s=60.0, now=1.0)
    assert a.adapter_version == 0
    store.finish_leased(a, result=manifest(), metrics={}, now=2.0, adapter_uri="file:///ad/rt/v1", ready_fields={})
    b = store.claim(worker="w1", lease_s=60.0, now=3.0)
    assert b.adapter_version == 1
    stale = replace(b, adapter_version=0)  # as if it ran on version 0: its update would overwrite version 1
    with pytest.raises(AdapterConflictError, match="version 1 was published by another round"):
        store.finish_leased(stale, result=manifest(), metrics={}, now=4.0, adapter_uri="file:///ad/rt/x",
                            ready_fields={})
    assert store.get_submission(b.submission.submission_id).stage == "running"  # nothing of it was kept
    assert store.release(b, now=4.0) is True
    b = store.claim(worker="w1", lease_s=60.0, now=5.0)
    store.finish_leased(b, result=manifest(), metrics={}, now=6.0, adapter_uri="file:///ad/rt/v2", ready_fields={})
    assert [(v.version, v.uri) for v in store.adapter_versions("rt")] == [(1, "file:///ad/rt/v1"),
                                                                          (2, "file:///ad/rt/v2")]


def test_concurrent_claims_never_share_a_submission_or_a_task(pg_store, pg_dsn):
    from crosslm_server.service.store.postgres import PostgresStore

    store = pg_store
    tasks = ["t0", "t1", "t2", "t3"]
    for i in range(40):
        submitted(store, f"up-{i:05d}", silo=f"s{i % 5}", task=tasks[i % 4])
    stores = [PostgresStore(pg_dsn, pool_size=1) for _ in range(6)]
    claimed: list[list[str]] = [[] for _ in stores]
    running_tasks: set[str] = set()
    guard, start = threading.Lock(), threading.Barrier(len(stores))
    errors: list[str] = []

    def work(k: int) -> None:
        s = stores[k]
        start.wait()
        while (lease := s.claim(worker=f"w{k}", lease_s=60.0, now=1.0)) is not None or s.queue_depth():
            if lease is None:
                time.sleep(0.005)  # every queued task is running elsewhere right now
                continue
            with guard:
                if lease.submission.task in running_tasks:
                    errors.append(f"two rounds of {lease.submission.task} at once")
                running_tasks.add(lease.submission.task)
            claimed[k].append(lease.submission.submission_id)
            time.sleep(0.01)  # the round: another claim of its task would overlap it here
            with guard:
                running_tasks.discard(lease.submission.task)
            s.finish_leased(lease, result=manifest(), metrics={}, now=2.0, adapter_uri="file:///x", ready_fields={})

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for s in stores:
        s.close()
    every = [sid for mine in claimed for sid in mine]
    assert errors == []
    assert sorted(every) == sorted(f"s-up-{i:05d}" for i in range(40))  # each exactly once
    assert sum(1 for mine in claimed if mine) >= 2  # the claims really were spread over workers
    assert [v.version for v in store.adapter_versions("t0")] == list(range(1, 11))
