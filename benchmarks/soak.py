"""Soak: N silo daemons x R rounds against one `crosslm-server` process, over mTLS, tiny models.

Not part of CI. The server runs in its own process (tiny engine, SQLite store) so its RSS can be
sampled alone; the daemons run as threads of this process, each with its own certificate.
Reports submissions expected / ready / lost / duplicated and the server's RSS over time.

    .venv/bin/python benchmarks/soak.py --silos 16 --rounds 5 --out runs/soak
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

import psutil

from crosslm_client.config import load_silo_config
from crosslm_client.daemon import run
from crosslm_shared.certs import make_certs

POS = ["good film", "great fun movie", "i love it", "the best story", "really nice plot", "very funny"]
NEG = ["bad film", "boring dull movie", "i hate it", "the worst story", "awful weak plot", "very poor"]


def start_server(root: Path, certs: Path) -> tuple[subprocess.Popen, int, int]:
    config = root / "server.toml"
    config.write_text(f'[server]\ngrpc_host = "127.0.0.1"\ngrpc_port = 0\nhttp_host = "127.0.0.1"\nhttp_port = 0\n'
                      f'data_dir = "data"\ntls_cert = "{certs / "server.pem"}"\ntls_key = "{certs / "server.key"}"\n'
                      f'tls_ca = "{certs / "ca.pem"}"\ngrpc_workers = 64\n'
                      '[store]\nkind = "sqlite"\n[engine]\nname = "tiny"\n')
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "crosslm_server.server_cli", "serve", "--config", str(config),
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
                      f'data = "{name}.jsonl"\narch = "tiny"\nseed = 1\n[server]\naddress = "localhost:{grpc_port}"\n'
                      f'ca = "{certs / "ca.pem"}"\ncert = "{certs / (name + ".pem")}"\nkey = "{certs / (name + ".key")}"\n'
                      f'max_attempts = 20\n[train]\nepochs = 1\nlrs = [0.001]\ncontinue_epochs = 1\n'
                      f'[rounds]\ncount = {rounds}\n')
    return config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--silos", type=int, default=16, help="silo daemons (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per silo (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/soak"), help="output folder (default: %(default)s)")
    p.add_argument("--sample-s", type=float, default=1.0, help="RSS sampling period (default: %(default)s)")
    args = p.parse_args(argv)
    root = args.out.resolve()
    root.mkdir(parents=True, exist_ok=True)
    names = [f"soak-{i:02d}" for i in range(args.silos)]
    make_certs(root / "certs", server_hosts=[], silos=names, force=True)
    proc, grpc_port, http_port = start_server(root, root / "certs")
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
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/submissions", timeout=30) as r:
        subs = json.loads(r.read())["submissions"]
    done.set()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    per_upload = Counter(s["upload_id"] for s in subs)
    expected = args.silos * args.rounds
    ready = sum(s["stage"] == "ready" for s in subs)
    rss = [mib for _, mib in samples]
    summary = {"silos": args.silos, "rounds": args.rounds, "expected": expected, "submissions": len(subs),
               "ready": ready, "lost": expected - ready, "duplicated": sum(n - 1 for n in per_upload.values()),
               "daemon_failures": {n: r for n, r in results.items() if not isinstance(r, list)},
               "daemon_outcomes": dict(Counter(o for r in results.values() if isinstance(r, list) for o in r)),
               "elapsed_s": round(elapsed, 1),
               "server_rss_mib": {"first": round(rss[0], 1) if rss else None, "peak": round(max(rss), 1) if rss else None,
                                  "last": round(rss[-1], 1) if rss else None},
               "rss_samples": [(t, round(m, 1)) for t, m in samples]}
    (root / "soak.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "rss_samples"}, indent=2))
    return 0 if summary["lost"] == 0 and summary["duplicated"] == 0 and not summary["daemon_failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
