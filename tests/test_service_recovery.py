"""Crash recovery (kill -9): the server mid-upload and mid-round, a client mid-upload.

The server runs as a real `crosslm-server serve` process on a SQLite store; after SIGKILL it
is started again on the same data_dir. Uploads resume from the committed offset, an
interrupted round runs again and finishes once, nothing accepted is lost.
"""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from crosslm_client.transport import CrossLMClient, RetryPolicy, TransportError
from crosslm_shared.bundle import make_manifest, sha256_file
from scale_helpers import Proc, server_toml
from service_helpers import LABELS, address, server_config, start_server, tiny_bundle

pytestmark = pytest.mark.recovery
CHUNK = 256 * 1024
FAST = RetryPolicy(initial_s=0.05, max_s=0.5, max_attempts=20)


class ServerProcess(Proc):
    """`crosslm-server serve` on a SQLite store in `root` (scale_helpers.Proc: start, kill9, stop)."""

    def __init__(self, root, *, engine_options: str = "", engine: str = "fakes.tiny_engine:TinyEngine"):
        config = root / "server.toml"
        config.write_text(server_toml(store='kind = "sqlite"', engine=engine, engine_options=engine_options))
        super().__init__(config, "serve", "server")


@pytest.fixture
def big_bundle(tmp_path):
    folder, _ = tiny_bundle(tmp_path / "silo")
    save_file({"w": torch.randn(7 * CHUNK // 4 + 5)}, str(folder / "model.safetensors"))
    return folder, make_manifest(folder, task="rt", silo="a", arch="tiny", labels=LABELS)


def test_server_killed_mid_upload_resumes_from_the_committed_offset(tmp_path, big_bundle):
    folder, manifest = big_bundle
    server = ServerProcess(tmp_path, engine="fakes.echo_engine:EchoEngine").start()  # echo: the big bundle is no loadable model
    try:
        errors = []

        def slow_upload():
            with CrossLMClient(server.address, "a", chunk_size=CHUNK, retry=RetryPolicy(max_attempts=1)) as client:
                try:
                    client.upload(folder, manifest, "a-crash-up-01", on_chunk=lambda c: time.sleep(0.2))
                except TransportError as e:
                    errors.append(e)

        uploader = threading.Thread(target=slow_upload)
        uploader.start()
        with CrossLMClient(server.address, "a", chunk_size=CHUNK, retry=FAST) as probe:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                held = probe.query_upload("a-crash-up-01")
                if held and sum(held[0].values()) >= 2 * CHUNK:
                    break
                time.sleep(0.02)
        server.kill9()
        uploader.join(30)
        assert errors, "the upload should have failed with the server gone"
        server.start()
        with CrossLMClient(server.address, "a", chunk_size=CHUNK, retry=FAST) as client:
            committed, complete = client.query_upload("a-crash-up-01")
            held = sum(committed.values())
            assert not complete and held >= 2 * CHUNK  # what was fsynced before the kill survived
            resent = []
            client.upload(folder, manifest, "a-crash-up-01", on_chunk=lambda c: resent.append(len(c.data)))
            assert sum(resent) == manifest.total_size - held  # only what was missing
            assert client.query_upload("a-crash-up-01")[1]
        bundle = tmp_path / "data" / "bundles" / "a-crash-up-01"
        for entry in manifest.files:
            assert sha256_file(bundle / entry.name) == entry.sha256
        assert not (tmp_path / "data" / "uploads" / "a-crash-up-01").exists()
    finally:
        server.stop()


def submit_and_kill_at(server: ServerProcess, folder, manifest, upload_id: str, kind: str):
    """Upload and submit, kill -9 the server at the first event of ``kind``, start it again."""
    with CrossLMClient(server.address, "a", retry=FAST) as client:
        client.upload(folder, manifest, upload_id)
        sub = client.submit(upload_id)
        for event in client.watch(sub.submission_id):
            if event.kind == kind:
                break
    server.kill9()
    server.start()
    return sub


def test_server_killed_mid_round_runs_it_again_once(tmp_path):
    folder, manifest = tiny_bundle(tmp_path / "silo")
    server = ServerProcess(tmp_path, engine_options="step_seconds = 0.5").start()
    try:
        sub = submit_and_kill_at(server, folder, manifest, "a-crash-rd-01", "generating")
        with CrossLMClient(server.address, "a", retry=FAST) as client:
            events = list(client.watch(sub.submission_id))
            assert events[-1].kind == "ready", [e.kind for e in events]
            kinds = [e.kind for e in events]
            assert kinds.count("ready") == 1 and kinds.count("started") == 2  # interrupted, then once more
            assert any(e.kind == "queued" and e.fields.get("rerun") for e in events)
            assert [s.submission_id for s in client.list_submissions()] == [sub.submission_id]
            assert client.submit("a-crash-rd-01").submission_id == sub.submission_id  # not queued twice
            done = client.get_submission(sub.submission_id)
            out = client.download(sub.submission_id, done.result, tmp_path / "back")
            assert all(sha256_file(out / f.name) == f.sha256 for f in done.result.files)
    finally:
        server.stop()


CLIENT = """
import sys, time
from pathlib import Path
from crosslm_client.transport import CrossLMClient
from crosslm_shared.bundle import make_manifest
folder = Path(sys.argv[2])
manifest = make_manifest(folder, task="rt", silo="a", arch="tiny", labels=("neg", "pos"))
with CrossLMClient(sys.argv[1], "a", chunk_size=262144) as client:
    client.upload(folder, manifest, "a-crash-cl-01", on_chunk=lambda c: time.sleep(0.3))
"""


def test_client_killed_mid_upload_resumes_after_restart(tmp_path, big_bundle):
    folder, manifest = big_bundle
    server = start_server(server_config(tmp_path / "server", engine="fakes.echo_engine:EchoEngine"))
    try:
        proc = subprocess.Popen([sys.executable, "-c", CLIENT, address(server), str(folder)])
        with CrossLMClient(address(server), "a", chunk_size=CHUNK, retry=FAST) as probe:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                held = probe.query_upload("a-crash-cl-01")
                if held and sum(held[0].values()) >= 2 * CHUNK:
                    break
                assert proc.poll() is None
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            time.sleep(0.5)  # the server notices the dead stream
            committed, complete = probe.query_upload("a-crash-cl-01")
            held = sum(committed.values())
            assert not complete and held >= 2 * CHUNK
            resent = []
            probe.upload(folder, manifest, "a-crash-cl-01", on_chunk=lambda c: resent.append(len(c.data)))
            assert sum(resent) == manifest.total_size - held
            assert probe.query_upload("a-crash-cl-01")[1]
        assert server.readiness()[0]
    finally:
        server.stop(grace=1)


def test_server_killed_mid_round_never_applies_a_round_twice_to_the_llm_adapter(tmp_path, tiny_sim_config,
                                                                                   toy_task_path, tiny_slm_dir):
    """The real engine (tiny models): whenever the kill lands, one adapter version per submission."""
    from conftest import write_task
    from crosslm_server.engines.adapters import AdapterStore
    from crosslm_shared.slm import new_slm
    from crosslm_shared.tasks import load_task

    (tmp_path / "task").mkdir()
    task_path = write_task(tmp_path / "task", labels=("negative", "positive"))
    tiny_sim_config.write_text(tiny_sim_config.read_text().replace(str(toy_task_path), str(task_path)))
    task = load_task(task_path)
    folder = new_slm(str(tiny_slm_dir), task.label_names).save(tmp_path / "silo" / "slm")
    manifest = make_manifest(folder, task=task.name, silo="a", arch="bert", labels=tuple(task.label_names))
    server = ServerProcess(tmp_path, engine="crosslm",
                           engine_options=f'config = "{tiny_sim_config}"\ntasks = ["{task_path}"]').start()
    try:
        sub = submit_and_kill_at(server, folder, manifest, "a-crash-llm-01", "training_llm")
        with CrossLMClient(server.address, "a", retry=FAST) as client:
            kinds = [e.kind for e in client.watch(sub.submission_id)]
            assert kinds[-1] == "ready" and kinds.count("ready") == 1, kinds
            metrics = client.get_submission(sub.submission_id).metrics
        versions = AdapterStore(tmp_path / "data" / "adapters").versions()
        # one version, or none when the round kept no sample (such a round never changes the LLM)
        updated = metrics.get("llm_updated", 1) == 1  # no key: a rerun whose version was saved before the kill
        assert [v.meta["submission_id"] for v in versions] == ([sub.submission_id] if updated else []), metrics
    finally:
        server.stop()
