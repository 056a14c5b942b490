#!/usr/bin/env python3
"""Many silos uploading at once: aggregate throughput against one stream, in the same run.

    .venv/bin/python benchmarks/concurrency.py [--quick] [--silos 1,4,16,32] [--total-mib 1024]

One `crosslm-server serve` process (engine "echo", its default config: 64 gRPC workers, 8 of them
reserved for unary calls, 4 uploads per silo) over mTLS, each silo with its own certificate (its CN is its identity;
`--plaintext` names silos by the dev-mode header instead). Each level uploads about the same
total (`--total-mib`, split evenly over the silos), so every level runs for a similar time;
the silos are threads of this process that start together on a barrier, each with its own
channel and the product client, retries off: any error counts as a failure. Aggregate
throughput = bytes / (last finish - first start). The baseline, one stream, runs first and
last; the better of the two is the ratio's denominator.
"""
from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

import grpc

from _common import (MiB, Measure, base_parser, big_bundle, bundle_for, drop_dirty_pages, emit_json, load_avg,
                     machine, print_table, ratio, start_server, workdir)
from crosslm_client.transport import RetryPolicy

GOAL_AT_32 = 0.8


def parse_args(argv: list[str] | None = None):
    p = base_parser(__doc__)
    p.add_argument("--silos", default="1,4,16,32", help="concurrent silos per level (default 1,4,16,32)")
    p.add_argument("--total-mib", type=int, default=None, help="bytes per level in MiB (default 1024, quick 512)")
    p.add_argument("--repeats", type=int, default=None, help="runs per level, best kept (default 3, quick 2)")
    p.add_argument("--plaintext", action="store_true", help="dev-mode identities instead of mTLS")
    args = p.parse_args(argv)
    args.silos = [int(s) for s in args.silos.split(",")]
    args.total_mib = args.total_mib or (512 if args.quick else 1024)
    args.repeats = args.repeats or (2 if args.quick else 3)
    return args


def run_level(server, root: Path, n: int, total_mib: int, tag: str) -> dict:
    """`n` silos upload total_mib / n MiB each, all at once."""
    per = max(1, total_mib // n)
    folder, manifest = big_bundle(root / f"src-{tag}", per)
    bundles = [bundle_for(folder, manifest, f"silo-{i:02d}", root / f"src-{tag}" / f"silo-{i:02d}") for i in range(n)]
    barrier = threading.Barrier(n + 1)
    spans: list[tuple[float, float]] = []
    failures: list[str] = []
    lock = threading.Lock()

    def silo(i: int) -> None:
        path, m = bundles[i]
        try:
            with server.client(m.silo, retry=RetryPolicy(max_attempts=1)) as client:
                grpc.channel_ready_future(client.channel).result(timeout=60)  # the TLS handshake is not the upload
                barrier.wait()
                t0 = time.perf_counter()
                client.upload(path, m, f"{tag}-{m.silo}")
                t1 = time.perf_counter()
            with lock:
                spans.append((t0, t1))
        except Exception as e:  # noqa: BLE001 - every failure is counted and named
            with lock:
                failures.append(f"{m.silo}: {type(e).__name__}: {e}")
            if not barrier.broken:
                barrier.abort()

    threads = [threading.Thread(target=silo, args=(i,), name=f"silo-{i}") for i in range(n)]
    for t in threads:
        t.start()
    drop_dirty_pages()
    with Measure(server.pid) as m:
        try:
            barrier.wait(timeout=300)
        except threading.BrokenBarrierError:
            pass
        for t in threads:
            t.join()
    shutil.rmtree(root / f"src-{tag}")
    for i in range(n):
        shutil.rmtree(server.root / "data" / "bundles" / f"{tag}-silo-{i:02d}", ignore_errors=True)
    moved = manifest.total_size * len(spans)
    wall = (max(e for _, e in spans) - min(s for s, _ in spans)) if spans else float("nan")
    return {"silos": n, "mib_per_silo": per, "ok": len(spans), "failures": len(failures),
            "failure_examples": failures[:3], "aggregate_mib_s": round(moved / MiB / wall, 1) if spans else 0.0,
            "slowest_silo_s": round(max(e - s for s, e in spans), 2) if spans else float("nan"),
            "server_cpu_ms_per_mib": round(1000 * m.cpu_s[server.pid] / max(1, moved / MiB), 2),
            "server_rss_growth_mib": m.rss_mib[server.pid]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load0 = load_avg()
    names = [f"silo-{i:02d}" for i in range(max(args.silos))]
    levels = [1] + [n for n in args.silos if n != 1] + [1]  # the baseline first and last
    runs: dict[int, list[dict]] = {}
    with workdir(args.workdir, "crosslm-concurrency-") as root:
        server = start_server(root, tls=not args.plaintext, silos=names, profile=args.profile)
        try:
            for rep in range(args.repeats):
                for k, n in enumerate(levels):
                    res = run_level(server, root, n, args.total_mib, f"c{rep}-{k}-{n}")
                    runs.setdefault(n, []).append(res)
                    print(f"  run {rep + 1}: {n} silos: {res['aggregate_mib_s']} MiB/s, {res['failures']} failures",
                          file=sys.stderr)
        finally:
            server.stop()
    best = {n: max(rs, key=lambda r: r["aggregate_mib_s"]) | {"failures": sum(r["failures"] for r in rs)}
            for n, rs in runs.items()}
    one = best[1]["aggregate_mib_s"]
    rows = [[n, r["mib_per_silo"], r["aggregate_mib_s"], ratio(r["aggregate_mib_s"], one), r["failures"],
             r["slowest_silo_s"], r["server_cpu_ms_per_mib"], r["server_rss_growth_mib"]] for n, r in sorted(best.items())]
    print_table(["silos", "MiB each", "aggregate MiB/s", "vs one stream", "failures", "slowest s", "server CPU ms/MiB",
                 "server RSS +MiB"], rows, title=f"concurrent uploads ({'plaintext' if args.plaintext else 'mTLS'}), "
                                                  f"best of {args.repeats}")
    top = max(args.silos)
    figures = {"vs_one_stream": {str(n): ratio(r["aggregate_mib_s"], one) for n, r in sorted(best.items())},
               "failures": sum(r["failures"] for r in best.values()),
               f"vs_one_stream_at_{top}": ratio(best[top]["aggregate_mib_s"], one)}
    met = figures[f"vs_one_stream_at_{top}"] >= GOAL_AT_32 and figures["failures"] == 0
    print(f"at {top} silos: {figures[f'vs_one_stream_at_{top}']} of one stream, {figures['failures']} failures; "
          f"goal >= {GOAL_AT_32} and no failures: {'met' if met else 'MISSED'}")
    emit_json({"script": "concurrency", "quick": args.quick, "tls": not args.plaintext, "total_mib": args.total_mib,
               **figures, "goal_met": met, "levels": {str(n): r for n, r in sorted(best.items())},
               "machine": machine(started_load=load0)}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
