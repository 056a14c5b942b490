"""The worker's lease path in one process, on the MemoryStore (the LeaseStore contract): a round
whose lease is lost mid-way is neither published nor failed, and a round whose adapter version
was taken goes back to the queue instead of being rebased."""
import shutil
from dataclasses import replace

from crosslm_shared.records import Upload
from crosslm_server.service.config import Limits, WorkerSection
from crosslm_server.service.logic import CrossLMService
from crosslm_server.service.metrics import Metrics
from crosslm_server.service.store import MemoryStore
from crosslm_server.service.worker import Worker
from service_helpers import tiny_bundle

LEASE = WorkerSection(builtin=False, lease_s=30.0, heartbeat_s=10.0)


class Engine:
    """Hands the SLM back; `during` runs at its one step (to change the world mid-round)."""

    def __init__(self, during=lambda: None):
        self.during = during

    def ready(self):
        return True

    def run_round(self, request, emit):
        self.during()
        emit("training_slm", {})
        return type("Outcome", (), {"slm_dir": request.slm_dir, "metrics": {}})()

    def commit(self, request, outcome):
        return {"adapter_uri": f"file:///adapters/{request.submission_id}"}


def setup(tmp_path, engine):
    store = MemoryStore()
    service = CrossLMService(store, tmp_path / "data", limits=Limits(max_bundle_bytes=1 << 30, chunk_size=1 << 20),
                             metrics=Metrics())
    folder, manifest = tiny_bundle(tmp_path / "silo")
    store.put_upload(Upload("a-upload-01", "a", manifest, complete=True))
    shutil.copytree(folder, service.bundle_dir("a-upload-01"))
    sub, _ = store.submit("a-upload-01", submission_id="sub-1", now=1.0)
    worker = Worker(service, lambda: engine, lease=LEASE, name="w1")
    worker.engine = engine
    return store, worker, sub


def test_a_round_whose_lease_is_lost_midway_is_neither_published_nor_failed(tmp_path):
    state = {}

    def take_over():  # the lease runs out and another worker claims the round
        store.reap_expired(now=1e9, max_attempts=3)
        state["other"] = store.claim(worker="w2", lease_s=30.0, now=1e9)

    store, worker, sub = setup(tmp_path, Engine(during=take_over))
    lease = store.claim(worker="w1", lease_s=30.0, now=2.0)
    worker.run_one(sub, lease=lease)
    events = [e.kind for e in store.events_after("sub-1", 0)]
    assert "ready" not in events and "failed" not in events, events
    assert store.get_submission("sub-1").stage == "running" and state["other"].worker == "w2"
    assert store.adapter_versions("rt") == []
    store.finish_leased(state["other"], result=store.get_upload("a-upload-01").manifest, metrics={}, now=1e9 + 1,
                        adapter_uri="file:///x", ready_fields={})  # the new holder still can
    assert [v.version for v in store.adapter_versions("rt")] == [1]


def test_a_round_whose_adapter_version_was_taken_goes_back_to_the_queue(tmp_path):
    store, worker, sub = setup(tmp_path, Engine())
    lease = store.claim(worker="w1", lease_s=30.0, now=2.0)
    worker.run_one(sub, lease=replace(lease, adapter_version=7))  # as if it ran on a version that is not the head
    assert store.get_submission("sub-1").stage == "queued"
    assert "ready" not in [e.kind for e in store.events_after("sub-1", 0)]
    again = store.claim(worker="w1", lease_s=30.0, now=3.0)
    worker.run_one(sub, lease=again)
    assert store.get_submission("sub-1").stage == "ready"
    assert [(v.version, v.uri) for v in store.adapter_versions("rt")] == [(1, "file:///adapters/sub-1")]
    assert "adapter_uri" not in store.get_submission("sub-1").metrics
