"""Operations over real sockets: health and readiness, metrics, restart with queued work,
two silos at once, failed rounds, SIGTERM on the real CLI."""
import json
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crosslm_client.transport import CrossLMClient, RetryPolicy, TransportError
from service_helpers import address, http_get, server_config, start_server, tiny_bundle

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(server, service):
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address(server)))
    return stub.Check(health_pb2.HealthCheckRequest(service=service)).status


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_readiness_goes_503_to_200_while_the_engine_loads(tmp_path):
    s = start_server(server_config(tmp_path / "srv", engine_options={"load_seconds": 1.0}))
    try:
        status, body = http_get(s, "/readyz")
        assert status == 503 and json.loads(body) == {"ready": False, "reason": "engine is loading"}
        assert http_get(s, "/healthz")[0] == 200
        assert health(s, "") == SERVING
        assert health(s, "crosslm.v1.CrossLM") == NOT_SERVING
        assert wait_for(lambda: http_get(s, "/readyz")[0] == 200)
        assert wait_for(lambda: health(s, "crosslm.v1.CrossLM") == SERVING)
    finally:
        s.stop(grace=1)
    assert s.health._server_status["crosslm.v1.CrossLM"] == NOT_SERVING  # noqa: SLF001
    assert s.health._server_status[""] == NOT_SERVING  # noqa: SLF001


def test_metrics_move_and_two_silos_run_at_once(tmp_path):
    s = start_server(server_config(tmp_path / "srv"))
    try:
        names = http_get(s, "/metrics")[1]
        for name in ("crosslm_bytes_received_total", "crosslm_bytes_sent_total", "crosslm_active_transfers",
                     "crosslm_queue_depth", "crosslm_stage_seconds", "crosslm_generation_tokens_per_second",
                     "crosslm_samples_kept_total", "crosslm_rounds_total"):
            assert name in names, name
        results = {}

        def silo(name, seed):
            folder, manifest = tiny_bundle(tmp_path / name, silo=name, seed=seed)
            with CrossLMClient(address(s), name) as c:
                c.upload(folder, manifest, f"{name}-upload-01")
                sub = c.submit(f"{name}-upload-01")
                events = list(c.watch(sub.submission_id))
                done = c.get_submission(sub.submission_id)
                c.download(sub.submission_id, done.result, tmp_path / name / "back")
                results[name] = (events, done)

        threads = [threading.Thread(target=silo, args=(n, i)) for i, n in enumerate(("a", "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert set(results) == {"a", "b"}
        assert all(done.stage == "ready" for _, done in results.values())
        # the later round scored with both silos' SLMs
        assert max(done.metrics["peers"] for _, done in results.values()) == 2
        text = http_get(s, "/metrics")[1]
        assert 'crosslm_rounds_total{outcome="done"} 2.0' in text
        assert "crosslm_bytes_received_total 0.0" not in text
        assert "crosslm_bytes_sent_total 0.0" not in text
        assert 'crosslm_stage_seconds_count{stage="generating"}' in text
        assert "crosslm_samples_kept_total 20.0" in text
        subs = json.loads(http_get(s, "/v1/submissions")[1])["submissions"]
        assert sorted(x["silo"] for x in subs) == ["a", "b"] and all(x["stage"] == "ready" for x in subs)
    finally:
        s.stop(grace=1)


def test_a_failing_round_reports_its_reason(tmp_path):
    s = start_server(server_config(tmp_path / "srv", engine_options={"fail_silos": ["a"]}))
    try:
        folder, manifest = tiny_bundle(tmp_path / "a")
        with CrossLMClient(address(s), "a") as c:
            c.upload(folder, manifest, "a-upload-fail1")
            sub = c.submit("a-upload-fail1")
            events = list(c.watch(sub.submission_id))
            assert events[-1].kind == "failed" and "told to fail" in events[-1].fields["reason"]
            assert c.get_submission(sub.submission_id).stage == "failed"
        assert 'crosslm_rounds_total{outcome="failed"} 1.0' in http_get(s, "/metrics")[1]
    finally:
        s.stop(grace=1)


def test_restart_runs_queued_and_interrupted_work(tmp_path):
    config = server_config(tmp_path / "srv")
    # first life: the engine never becomes ready, so nothing runs by itself
    s = start_server(config, engine_factory=lambda: _NeverReady())
    ids = []
    with CrossLMClient(address(s), "a") as c:
        for i in range(2):
            folder, manifest = tiny_bundle(tmp_path / f"a{i}", seed=i)
            c.upload(folder, manifest, f"a-upload-rst0{i}")
            ids.append(c.submit(f"a-upload-rst0{i}").submission_id)
    interrupted, queued = ids
    assert s.store.claim_next(now=time.time()).submission_id == interrupted  # as if a round was cut by a crash
    s.stop(grace=0.5)
    s2 = start_server(config)
    try:
        with CrossLMClient(address(s2), "a") as c:
            for sid in (interrupted, queued):
                events = list(c.watch(sid))
                assert events[-1].kind == "ready", [e.kind for e in events]
        kinds = [e.kind for e in s2.store.events_after(interrupted, 0)]
        assert kinds[:2] == ["queued", "queued"] and kinds[-1] == "ready"
        assert s2.store.events_after(interrupted, 0)[1].fields["rerun"] is True
    finally:
        s2.stop(grace=1)


def test_a_full_queue_is_resource_exhausted(tmp_path):
    s = start_server(server_config(tmp_path / "srv", max_queue=1), engine_factory=lambda: _NeverReady())
    try:
        with CrossLMClient(address(s), "a", retry=RetryPolicy(max_attempts=1)) as c:
            for i in range(2):
                folder, manifest = tiny_bundle(tmp_path / f"a{i}", seed=i)
                c.upload(folder, manifest, f"a-upload-full{i}")
            first = c.submit("a-upload-full0")
            assert c.submit("a-upload-full0").submission_id == first.submission_id  # idempotent even when full
            with pytest.raises(TransportError, match="RESOURCE_EXHAUSTED.*queue is full"):
                c.submit("a-upload-full1")
    finally:
        s.stop(grace=0.5)


class _NeverReady:
    def ready(self):
        return False

    def run_round(self, request, emit):
        raise AssertionError("never called")


def test_example_server_config_serves_everything_and_stops_on_sigterm(tmp_path):
    import re
    import urllib.request
    from pathlib import Path

    from crosslm_shared.certs import make_certs

    # The example serves mTLS with certificates under runs/certs; here they are made in tmp_path
    # (the same `crosslm certs` code) and passed with the flags that override the file's paths.
    certs = make_certs(tmp_path / "certs", server_hosts=[], silos=["silo-a"])
    example = Path(__file__).resolve().parent.parent / "examples" / "server.toml"
    proc = subprocess.Popen([sys.executable, "-m", "crosslm_server.service.cli", "serve", "--config", str(example),
                             "--grpc-port", "0", "--http-port", "0", "--data-dir", str(tmp_path / "data"),
                             "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
                             "--tls-ca", str(certs.ca)],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "serving gRPC" in line:
                break
        assert not any("PLAINTEXT DEV MODE" in l for l in lines) and "(mTLS)" in lines[-1]
        grpc_port, http_port = map(int, re.search(r":(\d+) and HTTP on .*:(\d+)", lines[-1]).groups())

        def get(path):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        assert wait_for(lambda: get("/readyz")[0] == 200, timeout=120)
        assert get("/healthz")[0] == 200
        assert get("/v1/submissions")[0] == 404  # the operators' view is off without an operator token
        assert "crosslm_rounds_total" in get("/metrics")[1]
        cert, key = certs.silos["silo-a"]
        creds = grpc.ssl_channel_credentials(certs.ca.read_bytes(), key.read_bytes(), cert.read_bytes())
        stub = health_pb2_grpc.HealthStub(grpc.secure_channel(f"localhost:{grpc_port}", creds))
        for service in ("", "crosslm.v1.CrossLM"):
            assert wait_for(lambda: stub.Check(health_pb2.HealthCheckRequest(service=service)).status == SERVING)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "data" / "state.db").exists()


def test_serving_without_certificates_exits_2_and_says_how_to_make_them(tmp_path):
    cfg = tmp_path / "server.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    r = subprocess.run([sys.executable, "-m", "crosslm_server.service.cli", "serve", "--config", str(cfg)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "tls_cert" in r.stderr and "crosslm certs" in r.stderr
    assert "plaintext_dev_mode = true" in r.stderr


def test_bad_config_exits_2_with_the_field_named(tmp_path):
    cfg = tmp_path / "server.toml"
    cfg.write_text('[server]\nchunk_size = 5\n')
    r = subprocess.run([sys.executable, "-m", "crosslm_server.service.cli", "serve", "--config", str(cfg)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "chunk_size=5" in r.stderr


def test_waiting_submissions_hear_their_new_queue_position(tmp_path):
    # three waiting rounds of one silo: above the default fair share (max_queued_per_silo = 2)
    s = start_server(server_config(tmp_path / "srv", engine_options={"step_seconds": 0.05}, max_queued_per_silo=3))
    try:
        ids = []
        with CrossLMClient(address(s), "a") as c:
            for i in range(3):
                folder, manifest = tiny_bundle(tmp_path / f"a{i}", seed=i)
                c.upload(folder, manifest, f"a-upload-pos0{i}")
            ids = [c.submit(f"a-upload-pos0{i}").submission_id for i in range(3)]
            last = list(c.watch(ids[2]))
        positions = [e.fields["position"] for e in last if e.kind == "queued"]
        assert positions[0] >= 2 and positions[-1] == 1 and positions == sorted(positions, reverse=True)
        assert last[-1].kind == "ready"
    finally:
        s.stop(grace=1)


def test_a_watcher_resumes_across_a_server_restart(tmp_path):
    """Shutdown ends Watch with UNAVAILABLE; the client reconnects and misses no event."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = server_config(tmp_path / "srv", grpc_port=port)
    s = start_server(config, engine_factory=lambda: _NeverReady())
    folder, manifest = tiny_bundle(tmp_path / "a")
    client = CrossLMClient(address(s), "a", retry=RetryPolicy(initial_s=0.2, max_s=0.5, max_attempts=30))
    client.upload(folder, manifest, "a-upload-watch1")
    sid = client.submit("a-upload-watch1").submission_id
    seen = []
    watcher = threading.Thread(target=lambda: seen.extend(client.watch(sid)))
    watcher.start()
    assert wait_for(lambda: len(seen) == 1)
    s.stop(grace=0.5)
    s2 = start_server(config)
    try:
        watcher.join(30)
        assert not watcher.is_alive()
        assert [e.seq for e in seen] == list(range(1, len(seen) + 1)) and seen[-1].kind == "ready"
    finally:
        client.close()
        s2.stop(grace=1)


def test_http_connections_are_tcp_nodelay(tmp_path):
    """asyncio sets TCP_NODELAY only on sockets created as IPPROTO_TCP; without it Nagle held each
    response's body behind the client's delayed ACK (40 ms per /healthz)."""
    import socket
    server = start_server(server_config(tmp_path))
    try:
        assert server.http_socket.proto == socket.IPPROTO_TCP
        assert http_get(server, "/healthz")[0] == 200
    finally:
        server.stop(grace=1)
