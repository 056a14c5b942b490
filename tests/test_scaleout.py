"""The scaled shape on a real PostgreSQL: `serve --no-worker` front-ends and `worker` processes
sharing the store and the data_dir (docs/service.md, "Production topology").

Two workers never run one submission; rounds of one task run one after another while two tasks
run in parallel; kill -9 of a worker mid-round ends, through another worker, in one `ready` and one
adapter version; a frozen worker whose lease was taken over cannot publish; a front-end restart
loses no Watch."""
import signal

import pytest

from crosslm_client.transport import CrossLMClient, RetryPolicy
from crosslm_shared.bundle import make_manifest, sha256_file
from scale_helpers import front_end, wait_for, worker, write_config
from service_helpers import LABELS, tiny_bundle

pytestmark = pytest.mark.recovery
FAST = RetryPolicy(initial_s=0.05, max_s=0.5, max_attempts=40)


class Cluster:
    """Processes on one database and one data_dir; `start` registers them for the teardown."""

    def __init__(self, root, dsn):
        from crosslm_server.service.store.postgres import PostgresStore

        self.root, self.dsn, self.procs = root / "cluster", dsn, []
        self.store = PostgresStore(dsn, pool_size=2)  # the test's own view of the shared state

    def config(self, **kw):
        return write_config(self.root, self.dsn, **kw)

    def start(self, proc):
        self.procs.append(proc)
        return proc.start()

    def close(self):
        for p in self.procs:
            p.stop()
        self.store.close()


@pytest.fixture
def cluster(tmp_path, pg_dsn):
    c = Cluster(tmp_path, pg_dsn)
    yield c
    c.close()


def submit(address, root, silo, task, *, seed=0):
    folder, _ = tiny_bundle(root / silo, silo=silo, seed=seed)
    manifest = make_manifest(folder, task=task, silo=silo, arch="tiny", labels=LABELS, temperature=1.0,
                             heldout_accuracy=0.5)
    with CrossLMClient(address, silo, retry=FAST) as client:
        upload_id = f"{silo}-{task}-upload"
        client.upload(folder, manifest, upload_id)
        return client.submit(upload_id)


def kinds(store, sid):
    return [e.kind for e in store.events_after(sid, 0)]


def running_worker(store, sid):
    with store._tx() as cur:  # the lease holder is not part of the Store contract: read the row
        return cur.execute("SELECT worker, attempts FROM submissions WHERE submission_id = %(id)s",
                           {"id": sid}).fetchone()


def test_two_workers_share_the_queue_one_round_per_task_two_tasks_in_parallel(cluster, tmp_path):
    path, store = cluster.config(step_seconds=0.4), cluster.store
    fe = cluster.start(front_end(path))
    cluster.start(worker(path, "w1"))
    cluster.start(worker(path, "w2"))
    subs = [submit(fe.address, tmp_path, silo, task, seed=i)
            for i, (silo, task) in enumerate((("a", "rt"), ("b", "rt"), ("c", "rt2"), ("d", "rt2")))]
    wait_for(lambda: sum(1 for s in store.list_submissions() if s.stage == "running") == 2,
             what="a round of each task running at once")
    wait_for(lambda: all(store.get_submission(s.submission_id).stage == "ready" for s in subs), what="every round")
    for s in subs:
        k = kinds(store, s.submission_id)
        assert k.count("started") == 1 and k.count("ready") == 1, k  # claimed once, by one worker
    workers = {running_worker(store, s.submission_id)[0] for s in subs}
    assert workers == {"w1", "w2"}
    for task, (first, second) in (("rt", subs[:2]), ("rt2", subs[2:])):
        ends = {s.submission_id: [e for e in store.events_after(s.submission_id, 0) if e.kind in ("started", "ready")]
                for s in (first, second)}
        (a_start, a_ready), (b_start, b_ready) = sorted(ends.values(), key=lambda ev: ev[0].time)
        assert b_start.time >= a_ready.time  # the task's second round began after its first was ready
        assert [v.version for v in store.adapter_versions(task)] == [1, 2]


def test_kill9_of_a_worker_mid_round_another_finishes_it_once(cluster, tmp_path):
    path, store = cluster.config(step_seconds=0.6, lease_s=3.0), cluster.store
    fe = cluster.start(front_end(path))
    w1, w2 = cluster.start(worker(path, "w1")), cluster.start(worker(path, "w2"))
    sub = submit(fe.address, tmp_path, "a", "rt")
    sid = sub.submission_id
    wait_for(lambda: "training_llm" in kinds(store, sid), what="the round past its scoring stage")
    holder = {"w1": w1, "w2": w2}[running_worker(store, sid)[0]]
    holder.kill9()
    wait_for(lambda: store.get_submission(sid).stage == "ready", what="the round finished by the other worker")
    events = store.events_after(sid, 0)
    k = [e.kind for e in events]
    assert k.count("ready") == 1 and k.count("started") == 2, k
    assert k.count("generating") == 2  # generated once (two steps): the rerun went on from the checkpoint
    assert "resumed" in k and any(e.kind == "queued" and e.fields.get("rerun") is True for e in events)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    other = ({"w1", "w2"} - {holder.name}).pop()
    assert running_worker(store, sid) == (other, 2)
    assert [(v.version, v.submission_id) for v in store.adapter_versions("rt")] == [(1, sid)]
    with CrossLMClient(fe.address, "a", retry=FAST) as client:
        done = client.get_submission(sid)
        out = client.download(sid, done.result, tmp_path / "back")
    assert all(sha256_file(out / f.name) == f.sha256 for f in done.result.files)


def test_a_worker_whose_lease_was_taken_over_cannot_publish(cluster, tmp_path):
    path, store = cluster.config(step_seconds=0.6, lease_s=2.0), cluster.store
    fe = cluster.start(front_end(path))
    w1 = cluster.start(worker(path, "w1"))
    sid = submit(fe.address, tmp_path, "a", "rt").submission_id
    wait_for(lambda: "scoring" in kinds(store, sid), what="w1 mid-round")
    w1.signal(signal.SIGSTOP)  # frozen: no heartbeat, its lease runs out
    cluster.start(worker(path, "w2"))
    wait_for(lambda: store.get_submission(sid).stage == "ready", what="w2 finishing the round")
    w1.signal(signal.SIGCONT)
    wait_for(lambda: "not published" in w1.log.read_text(), what="w1 noticing its lost lease")
    assert "lost its lease" in w1.log.read_text()  # fenced by its token (the adapter's CAS is the second guard)
    k = kinds(store, sid)
    assert k.count("ready") == 1 and "failed" not in k, k
    assert running_worker(store, sid)[0] == "w2"
    assert [v.submission_id for v in store.adapter_versions("rt")] == [sid]


def test_a_front_end_restart_loses_no_watch(cluster, tmp_path):
    path, store = cluster.config(step_seconds=0.5), cluster.store
    fa, fb = cluster.start(front_end(path, "fa")), cluster.start(front_end(path, "fb"))
    cluster.start(worker(path, "w1"))
    sid = submit(fa.address, tmp_path, "a", "rt").submission_id
    seen = []
    with CrossLMClient(fa.address, "a", retry=FAST) as client:
        for event in client.watch(sid):
            seen.append(event)
            if event.kind == "generating":
                break
    fa.kill9()  # the silo's front-end goes away mid-round; the round goes on in w1
    with CrossLMClient(fb.address, "a", retry=FAST) as client:
        seen += list(client.watch(sid, after_seq=seen[-1].seq))
    fa.start()  # and comes back: a Watch from the start through it sees the same events
    with CrossLMClient(fa.address, "a", retry=FAST) as client:
        again = list(client.watch(sid))
    stored = store.events_after(sid, 0)
    assert [(e.seq, e.kind) for e in seen] == [(e.seq, e.kind) for e in stored] == [(e.seq, e.kind) for e in again]
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert [e.kind for e in seen].count("ready") == 1 and [e.kind for e in seen].count("started") == 1


def test_kill9_of_a_crosslm_worker_mid_round_leaves_one_adapter_version(cluster, tmp_path, tiny_sim_config,
                                                                      toy_task_path, tiny_slm_dir):
    """The real engine on tiny models, two workers sharing data_dir/adapters: whichever dies, the
    round is applied to the LLM once, on disk and in the store's versions."""
    from conftest import write_task
    from crosslm_server.engines.adapters import AdapterStore
    from crosslm_shared.slm import new_slm
    from crosslm_shared.tasks import load_task
    from scale_helpers import server_toml

    (tmp_path / "task").mkdir()
    task_path = write_task(tmp_path / "task", labels=("negative", "positive"))
    tiny_sim_config.write_text(tiny_sim_config.read_text().replace(str(toy_task_path), str(task_path)))
    task = load_task(task_path)
    cluster.root.mkdir(parents=True)
    path = cluster.root / "server.toml"
    path.write_text(server_toml(
        store=f'kind = "postgres"\ndsn = "{cluster.dsn}"', worker="builtin = false\nlease_s = 4\nheartbeat_s = 1",
        engine="crosslm", engine_options=f'config = "{tiny_sim_config}"\ntasks = ["{task_path}"]'))
    fe = cluster.start(front_end(path))
    w1, w2 = cluster.start(worker(path, "w1")), cluster.start(worker(path, "w2"))
    folder = new_slm(str(tiny_slm_dir), task.label_names).save(tmp_path / "silo" / "slm")
    manifest = make_manifest(folder, task=task.name, silo="a", arch="bert", labels=tuple(task.label_names))
    with CrossLMClient(fe.address, "a", retry=FAST) as client:
        client.upload(folder, manifest, "a-crash-llm-01")
        sid = client.submit("a-crash-llm-01").submission_id
    store = cluster.store
    wait_for(lambda: "training_llm" in kinds(store, sid), timeout_s=600, what="the round updating the LLM")
    {"w1": w1, "w2": w2}[running_worker(store, sid)[0]].kill9()
    wait_for(lambda: store.get_submission(sid).terminal, timeout_s=600, what="the round finished by the other worker")
    sub = store.get_submission(sid)
    assert sub.stage == "ready" and kinds(store, sid).count("ready") == 1, (sub.error, kinds(store, sid))
    on_disk = AdapterStore(cluster.root / "data" / "adapters").versions()
    if sub.metrics.get("llm_updated") == 1:
        assert [v.meta["submission_id"] for v in on_disk] == [sid]
        assert [(v.version, v.submission_id, v.uri) for v in store.adapter_versions(task.name)] == [
            (1, sid, on_disk[0].path.resolve().as_uri())]
    else:  # the round kept no sample: it never changes the LLM
        assert on_disk == [] and store.adapter_versions(task.name) == []
    assert "adapter_uri" not in sub.metrics  # a server location is never shown to a silo
