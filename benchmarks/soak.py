"""Soak: N silo daemons x R rounds against one `crosslm-server` process, over mTLS, tiny models.

Not part of CI. The server runs in its own process (tiny engine, SQLite store) so its RSS can be
sampled alone; the daemons run as threads of this process, each with its own certificate.
Reports submissions expected / ready / lost / duplicated and the server's RSS over time.

With ``--hostile`` one more silo (``hostile``, a valid certificate) misbehaves for the whole run:
it holds every stream its quota allows (Watch streams and idle uploads), bursts submissions,
fills its pending-upload quota with header-only uploads, sends NaN-weight and wrong-label
bundles (retried while its stream quota is full, so each reaches the server's checks: the NaN one
the content check in the bounded admission child) and malformed messages, and the server fails every round of its own (tiny engine
``fail_silos``), so its SLM is never admitted as a scorer. The summary then counts the
well-behaved silos' lost and failed rounds, the hostile silo's refusals by status code, and the
gRPC health check's latency sampled during the run.

    .venv/bin/python benchmarks/soak.py --silos 16 --rounds 5 --out runs/soak
    .venv/bin/python benchmarks/soak.py --silos 16 --rounds 3 --hostile --out runs/soak-hostile
"""
from __future__ import annotations

import argparse
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

import _common  # noqa: F401 - puts the tests' engines and tiny SLMs (tests/fakes) on the path

from crosslm_client.config import load_silo_config
from crosslm_client.daemon import run
from crosslm_shared.certs import make_certs
from crosslm_shared.records import Stage

HOSTILE = "hostile"
OPERATOR_TOKEN = "soak-operator-token-0123456789"

POS = ["good film", "great fun movie", "i love it", "the best story", "really nice plot", "very funny"]
NEG = ["bad film", "boring dull movie", "i hate it", "the worst story", "awful weak plot", "very poor"]


def start_server(root: Path, certs: Path, *, hostile: bool = False) -> tuple[subprocess.Popen, int, int]:
    config = root / "server.toml"
    engine = f'[engine.options]\nfail_silos = ["{HOSTILE}"]\n' if hostile else ""
    config.write_text(f'[server]\ngrpc_host = "127.0.0.1"\ngrpc_port = 0\nhttp_host = "127.0.0.1"\nhttp_port = 0\n'
                      f'data_dir = "data"\ntls_cert = "{certs / "server.pem"}"\ntls_key = "{certs / "server.key"}"\n'
                      f'tls_ca = "{certs / "ca.pem"}"\ngrpc_workers = 64\nidle_timeout_s = 20\n'
                      f'operator_token = "{OPERATOR_TOKEN}"\n'
                      f'[store]\nkind = "sqlite"\n[engine]\nname = "fakes.tiny_engine:TinyEngine"\n{engine}')
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "crosslm_server.service.cli", "serve", "--config", str(config),
                             "--grpc-port", "0", "--http-port", "0"], stderr=log, cwd=root)
    proc_log = root / "server.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = proc_log.read_text()
        match = re.search(r":(\d+) and HTTP on .*:(\d+)", text)
        if match:
            return proc, int(match.group(1)), int(match.group(2))
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {text}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"server did not start within 120 s: {proc_log.read_text()[-2000:]}")


def write_silo(root: Path, certs: Path, name: str, grpc_port: int, rounds: int) -> Path:
    rng = random.Random(name)
    rows = [{"text": f"{rng.choice(POS if i % 2 else NEG)} {rng.randrange(10**6)}", "label": "pos" if i % 2 else "neg"}
            for i in range(32)]
    (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = root / f"{name}.toml"
    config.write_text(f'output_dir = "{name}-out"\n[silo]\nname = "{name}"\ntask = "rt"\nlabels = ["neg", "pos"]\n'
                      f'data = "{name}.jsonl"\narch = "fakes.tiny_slm:TINY"\nseed = 1\n[server]\naddress = "localhost:{grpc_port}"\n'
                      f'ca = "{certs / "ca.pem"}"\ncert = "{certs / (name + ".pem")}"\nkey = "{certs / (name + ".key")}"\n'
                      f'max_attempts = 20\n[train]\nmax_epochs = 1\nlrs = [0.001]\ncontinue_epochs = 1\n'
                      f'[rounds]\ncount = {rounds}\n')
    return config


class Hostile:
    """The misbehaving silo: a loop of attacks on every shared resource until `stop` is set."""

    def __init__(self, root: Path, certs: Path, grpc_port: int):
        from fakes.tiny_slm import new_tiny_slm
        from crosslm_shared.bundle import make_manifest

        self.refusals: Counter[str] = Counter()
        self.health_s: list[float] = []
        self.stop = threading.Event()
        self.bad_bundles: dict[str, Counter] = {"nan": Counter(), "labels": Counter()}
        creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes(), (certs / f"{HOSTILE}.key").read_bytes(),
                                             (certs / f"{HOSTILE}.pem").read_bytes())
        self.channel = grpc.secure_channel(f"localhost:{grpc_port}", creds)
        health_creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes(),
                                                    (certs / "soak-00.key").read_bytes(),
                                                    (certs / "soak-00.pem").read_bytes())
        self.health = health_pb2_grpc.HealthStub(grpc.secure_channel(f"localhost:{grpc_port}", health_creds))
        from crosslm_shared.protos.crosslm.v1 import crosslm_pb2_grpc as pb_grpc
        self.stub = pb_grpc.CrossLMStub(self.channel)
        self.bundles = []
        for n, labels in enumerate((["neg", "pos"], ["neg", "pos"], ["neg", "pos", "mixed"])):
            folder = new_tiny_slm(labels, seed=n, tokenizer_dir=root / "hostile-tok").save(root / f"hostile-slm-{n}")
            if n == 1:  # NaN weights
                from safetensors.torch import load_file, save_file
                state = load_file(folder / "model.safetensors")
                state["classifier.weight"] = state["classifier.weight"] * float("nan")
                save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
            self.bundles.append((folder, make_manifest(folder, task="rt", silo=HOSTILE, arch="tiny", labels=labels,
                                                       temperature=1.0, heldout_accuracy=0.5)))

    def _note(self, error: grpc.RpcError | None) -> None:
        self.refusals[error.code().name if error is not None else "OK"] += 1

    def _messages(self, upload_id, manifest, folder, *, hold: bool = False):
        from crosslm_shared import convert
        from crosslm_shared.protos.crosslm.v1 import crosslm_pb2 as pb
        from crosslm_shared.transfer import iter_chunks
        yield pb.UploadRequest(header=pb.UploadHeader(upload_id=upload_id, manifest=convert.manifest_to_pb(manifest)))
        if hold:
            self.stop.wait(120)  # an idle stream: the server cuts it after idle_timeout_s
            return
        for entry in manifest.files:
            for c in iter_chunks(folder / entry.name, name=entry.name):
                yield pb.UploadRequest(chunk=convert.chunk_to_pb(c))

    def _call(self, fn, *args, **kw):
        try:
            result = fn(*args, **kw)
            if hasattr(result, "__next__"):
                for _ in result:
                    pass
            self._note(None)
            return result
        except grpc.RpcError as e:
            self._note(e)
            return None

    def _send_bad(self, kind: str, upload_id: str, manifest, folder) -> None:
        """Upload a bad bundle until a stream slot frees up, so it reaches the content check."""
        for _ in range(20):
            try:
                self._call_raw(self.stub.Upload, self._messages(upload_id, manifest, folder))
                outcome = "OK"
            except grpc.RpcError as e:
                outcome = e.code().name
            self.bad_bundles[kind][outcome] += 1
            if outcome != "RESOURCE_EXHAUSTED" or self.stop.wait(0.5):
                return

    def _call_raw(self, fn, *args):
        try:
            result = fn(*args)
        except grpc.RpcError as e:
            self._note(e)
            raise
        self._note(None)
        return result

    def _hold(self, fn, *args) -> threading.Thread:
        t = threading.Thread(target=self._call, args=(fn, *args), daemon=True)
        t.start()
        return t

    def run(self) -> None:
        from crosslm_shared.protos.crosslm.v1 import crosslm_pb2 as pb
        good, nan, three = self.bundles
        threading.Thread(target=self._probe_health, daemon=True).start()
        n = 0
        while not self.stop.is_set():
            n += 1
            # a round of its own (the server fails it: never admitted) and a burst of submissions
            for k in range(4):
                uid = f"hostile-{n:04d}-{k}"
                self._call(self.stub.Upload, self._messages(uid, good[1], good[0]))
                sub = self._call(self.stub.Submit, pb.SubmitRequest(upload_id=uid))
                if sub is not None:  # hold every Watch stream its quota allows
                    for _ in range(10):
                        self._hold(self.stub.Watch, pb.WatchRequest(submission_id=sub.submission_id))
            for i in range(6):  # idle uploads and header-only uploads up to the pending quota
                self._hold(self.stub.Upload, self._messages(f"hostile-idle-{n:04d}-{i}", good[1], good[0], hold=True))
            for bad, (folder, manifest) in (("nan", nan), ("labels", three)):
                self._send_bad(bad, f"hostile-{bad}-{n:04d}", manifest, folder)
            raw = self.channel.unary_unary("/crosslm.v1.CrossLM/Submit", request_serializer=None,
                                           response_deserializer=None)
            self._call(raw, b"\xff\xff\xff\xff\x0f")
            self.stop.wait(2.0)

    def _probe_health(self) -> None:
        while not self.stop.wait(0.5):
            started = time.monotonic()
            try:
                self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                self.health_s.append(time.monotonic() - started)
            except grpc.RpcError:
                self.health_s.append(float("inf"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--silos", type=int, default=16, help="silo daemons (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per silo (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/soak"), help="output folder (default: %(default)s)")
    p.add_argument("--sample-s", type=float, default=1.0, help="RSS sampling period (default: %(default)s)")
    p.add_argument("--hostile", action="store_true", help="add one misbehaving silo (see above; default: off)")
    args = p.parse_args(argv)
    root = args.out.resolve()
    root.mkdir(parents=True, exist_ok=True)
    names = [f"soak-{i:02d}" for i in range(args.silos)]
    make_certs(root / "certs", server_hosts=[], silos=names + ([HOSTILE] if args.hostile else []), force=True)
    proc, grpc_port, http_port = start_server(root, root / "certs", hostile=args.hostile)
    hostile = Hostile(root, root / "certs", grpc_port) if args.hostile else None
    if hostile is not None:
        threading.Thread(target=hostile.run, name=HOSTILE, daemon=True).start()
    server = psutil.Process(proc.pid)
    samples: list[tuple[float, float]] = []
    done = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not done.wait(args.sample_s):
            samples.append((round(time.monotonic() - started, 1), server.memory_info().rss / 2**20))

    threading.Thread(target=sample, daemon=True).start()
    results: dict[str, object] = {}

    def daemon(name: str) -> None:
        try:
            reports = run(load_silo_config(write_silo(root, root / "certs", name, grpc_port, args.rounds)))
            results[name] = [r["outcome"] for r in reports]
        except Exception as e:  # noqa: BLE001 - a soak reports every failure instead of stopping
            results[name] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=daemon, args=(n,), name=n) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    if hostile is not None:
        hostile.stop.set()
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/submissions",
                                     headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        subs = [s for s in json.loads(r.read())["submissions"] if s["silo"] != HOSTILE]
    done.set()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    per_upload = Counter(s["upload_id"] for s in subs)
    expected = args.silos * args.rounds
    ready = sum(s["stage"] == Stage.READY for s in subs)
    rss = [mib for _, mib in samples]
    summary = {"silos": args.silos, "rounds": args.rounds, "expected": expected, "submissions": len(subs),
               "ready": ready, "lost": expected - ready, "duplicated": sum(n - 1 for n in per_upload.values()),
               "failed": sum(s["stage"] == Stage.FAILED for s in subs),
               "daemon_failures": {n: r for n, r in results.items() if not isinstance(r, list)},
               "daemon_outcomes": dict(Counter(o for r in results.values() if isinstance(r, list) for o in r)),
               "elapsed_s": round(elapsed, 1),
               "server_rss_mib": {"first": round(rss[0], 1) if rss else None, "peak": round(max(rss), 1) if rss else None,
                                  "last": round(rss[-1], 1) if rss else None},
               "rss_samples": [(t, round(m, 1)) for t, m in samples]}
    if hostile is not None:
        health = sorted(hostile.health_s)
        summary["hostile"] = {"calls_by_outcome": dict(hostile.refusals),
                              "bad_bundles_by_outcome": {k: dict(v) for k, v in hostile.bad_bundles.items()},
                              "health_checks": len(health),
                              "health_s": {"median": round(health[len(health) // 2], 4) if health else None,
                                           "max": round(health[-1], 4) if health else None}}
    (root / "soak.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "rss_samples"}, indent=2))
    ok = summary["lost"] == 0 and summary["failed"] == 0 and summary["duplicated"] == 0
    if hostile is not None:  # every bad bundle that reached the server was refused, and some did reach it
        ok = ok and all(not c["OK"] and c["INVALID_ARGUMENT"] for c in hostile.bad_bundles.values())
    return 0 if ok and not summary["daemon_failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
