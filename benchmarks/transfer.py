#!/usr/bin/env python3
"""Upload and download of a bundle through CrossLM, against bare grpcio, in the same run.

    .venv/bin/python benchmarks/transfer.py [--quick] [--sizes 64,1024] [--repeats 3]

For each size (default 64 MiB and 1 GiB; --quick 64 and 256 MiB) a bundle (tiny SLM files and
a model.safetensors of random F32) goes up and comes back down through:

- CrossLM, plaintext dev mode: `crosslm-server serve` in its own process, engine "echo" (hands
  the SLM back), the product client (`CrossLMClient`: resumable, CRC-32C per chunk, SHA-256,
  durable offsets);
- CrossLM over mTLS, the same;
- raw grpcio: `_raw_grpc.py` in its own process, the same bytes as messages of the same chunk
  size with identity serializers, written to a file and fsynced once (the ceiling);
- one unary message holding the whole file (its server and client alone get a message cap
  above the file size): the naive way, which holds the model in memory on both sides.

Throughput is the best of `--repeats` runs per method and direction, methods interleaved, the
page cache flushed (`sync`) before each timed transfer. RSS growth is the rise of the peak RSS
(VmHWM, reset before each transfer) of the server process and of this (client) process.
Ratios: upload_vs_raw, download_vs_raw and mtls_vs_plain are throughput ratios at the largest
size (mtls_vs_plain the lower of upload and download); vs_single_message is how many times more
memory the single message needed than CrossLM (peak RSS growth, the larger side of each).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc

from crosslm_shared.records import EventKind
from crosslm_shared.transfer import tune_malloc_for_chunks

import _raw_grpc as raw
from _common import (MiB, HERE, Measure, ServerProcess, base_parser, big_bundle, drop_dirty_pages,
                     emit_json, load_avg, machine, print_table, ratio, start_server, workdir)

GOALS = {"upload_vs_raw": 0.90, "download_vs_raw": 0.90, "vs_single_message": 10.0, "mtls_vs_plain": 0.70}
RSS_GOAL_MIB = 64.0


def parse_args(argv: list[str] | None = None):
    p = base_parser(__doc__)
    p.add_argument("--sizes", default=None, help="model.safetensors sizes in MiB (default 64,1024; quick 64,256)")
    p.add_argument("--repeats", type=int, default=3, help="runs per method and direction (default 3)")
    p.add_argument("--chunk", type=int, default=MiB, help="chunk size in bytes for CrossLM and raw (default 1 MiB)")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in (args.sizes or ("64,256" if args.quick else "64,1024")).split(",")]
    return args


class RawServer:
    """`_raw_grpc.py` in its own process."""

    def __init__(self, root: Path, name: str, max_message: int):
        self.store = root / f"{name}.bin"
        self.log = (root / f"{name}.log").open("w")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "_raw_grpc.py"), "--store", str(self.store),
                                      "--max-message", str(max_message)], stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        self.address = f"127.0.0.1:{self.proc.stdout.readline().split()[1]}"
        self.pid, self.max_message = self.proc.pid, max_message

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(self.address, options=raw.options(self.max_message))
        grpc.channel_ready_future(ch).result(timeout=30)
        return ch

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def _timed(server_pid: int, fn) -> tuple[float, float, float, float]:
    """(seconds, CPU seconds of server + client, server RSS growth, client RSS growth) of one transfer."""
    drop_dirty_pages()
    with Measure(server_pid, os.getpid()) as m:
        fn()
    return m.s, sum(m.cpu_s.values()), m.rss_mib[server_pid], m.rss_mib[os.getpid()]


def _figures(up_bytes: int, down_bytes: int, up: tuple, down: tuple) -> dict:
    return {"up": up_bytes / MiB / up[0], "down": down_bytes / MiB / down[0],
            "up_cpu_ms_per_mib": 1000 * up[1] / (up_bytes / MiB), "down_cpu_ms_per_mib": 1000 * down[1] / (down_bytes / MiB),
            "server_rss": max(up[2], down[2]), "client_rss": max(up[3], down[3])}


def run_crosslm(server: ServerProcess, folder: Path, manifest, tag: str, chunk: int) -> dict:
    dest = server.root / f"down-{tag}"
    with server.client("bench", chunk_size=chunk) as client:
        grpc.channel_ready_future(client.channel).result(timeout=30)
        up = _timed(server.pid, lambda: client.upload(folder, manifest, tag))
        sub = client.submit(tag)
        kinds = [e.kind for e in client.watch(sub.submission_id)]
        if kinds[-1] != EventKind.READY:
            raise SystemExit(f"echo round failed: {kinds}")
        result = client.get_submission(sub.submission_id).result
        down = _timed(server.pid, lambda: client.download(sub.submission_id, result, dest))
    for leftover in (dest, server.root / "data" / "bundles" / tag, server.root / "data" / "results" / sub.submission_id):
        shutil.rmtree(leftover, ignore_errors=True)  # keep the disk flat across 1 GiB repeats
    return _figures(manifest.total_size, result.total_size, up, down)


def run_raw(server: RawServer, source: Path, chunk: int, *, single: bool) -> dict:
    dest = server.store.with_suffix(".down")
    size = source.stat().st_size
    with server.channel() as ch:
        if single:
            up = _timed(server.pid, lambda: raw.upload_single(ch, source))
            down = _timed(server.pid, lambda: raw.download_single(ch, dest))
        else:
            up = _timed(server.pid, lambda: raw.upload_stream(ch, source, chunk))
            down = _timed(server.pid, lambda: raw.download_stream(ch, dest, chunk))
    dest.unlink()
    return _figures(size, size, up, down)


def best(runs: list[dict]) -> dict:
    """Best throughput and least CPU of the repeats (another job's load only slows a run down
    and costs it cache misses); the largest RSS growth seen (memory is judged by its worst case)."""
    return {"upload_mib_s": round(max(r["up"] for r in runs), 1), "download_mib_s": round(max(r["down"] for r in runs), 1),
            "upload_cpu_ms_per_mib": round(min(r["up_cpu_ms_per_mib"] for r in runs), 2),
            "download_cpu_ms_per_mib": round(min(r["down_cpu_ms_per_mib"] for r in runs), 2),
            "server_rss_growth_mib": max(r["server_rss"] for r in runs),
            "client_rss_growth_mib": max(r["client_rss"] for r in runs)}


def bench_size(root: Path, mib: int, args, servers: dict) -> dict:
    folder, manifest = big_bundle(root, mib)
    source = folder / "model.safetensors"
    single = RawServer(root, f"single-{mib}", max_message=source.stat().st_size + MiB)
    runs: dict[str, list[dict]] = {k: [] for k in ("crosslm", "crosslm_mtls", "raw_grpcio", "single_message")}
    try:
        methods = [("crosslm", lambda tag: run_crosslm(servers["plain"], folder, manifest, tag, args.chunk)),
                   ("raw_grpcio", lambda tag: run_raw(servers["raw"], source, args.chunk, single=False)),
                   ("crosslm_mtls", lambda tag: run_crosslm(servers["mtls"], folder, manifest, tag, args.chunk)),
                   ("single_message", lambda tag: run_raw(single, source, args.chunk, single=True))]
        for rep in range(args.repeats):
            order = methods[rep % len(methods):] + methods[:rep % len(methods)]  # no method always goes first
            for name, fn in order:
                runs[name].append(fn(f"bench-{mib}-{rep:02d}"))
                print(f"  {mib} MiB, run {rep + 1}/{args.repeats}, {name}: "
                      f"up {runs[name][-1]['up']:.0f} down {runs[name][-1]['down']:.0f} MiB/s", file=sys.stderr)
    finally:
        single.stop()
        shutil.rmtree(folder)
    out = {name: best(r) for name, r in runs.items()}
    c, t, r, s = out["crosslm"], out["crosslm_mtls"], out["raw_grpcio"], out["single_message"]
    c_rss = max(c["server_rss_growth_mib"], c["client_rss_growth_mib"])
    s_rss = max(s["server_rss_growth_mib"], s["client_rss_growth_mib"])
    out["ratios"] = {
        "upload_vs_raw": ratio(c["upload_mib_s"], r["upload_mib_s"]),
        "download_vs_raw": ratio(c["download_mib_s"], r["download_mib_s"]),
        "upload_vs_raw_cpu": ratio(r["upload_cpu_ms_per_mib"], c["upload_cpu_ms_per_mib"]),
        "download_vs_raw_cpu": ratio(r["download_cpu_ms_per_mib"], c["download_cpu_ms_per_mib"]),
        "mtls_vs_plain_upload": ratio(t["upload_mib_s"], c["upload_mib_s"]),
        "mtls_vs_plain_download": ratio(t["download_mib_s"], c["download_mib_s"]),
        "rss_growth_mib": c_rss,
        "single_message_rss_growth_mib": s_rss,
        "vs_single_message": ratio(s_rss, max(c_rss, 1.0), 1),
        "upload_vs_single_message_throughput": ratio(c["upload_mib_s"], s["upload_mib_s"]),
        "download_vs_single_message_throughput": ratio(c["download_mib_s"], s["download_mib_s"]),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load0 = load_avg()
    # the product's client entry point does this (crosslm-client); the raw client shares the
    # process, so it gets it too; the raw server does not (CROSSLM_TUNE_MALLOC=0: neither side)
    malloc_tuned = tune_malloc_for_chunks()
    results: dict[int, dict] = {}
    with workdir(args.workdir, "crosslm-transfer-") as root:
        servers: dict = {}
        try:
            servers["plain"] = start_server(root, name="plain", profile=args.profile)
            servers["mtls"] = start_server(root, name="mtls", tls=True, profile=args.profile)
            servers["raw"] = RawServer(root, "raw", max_message=6 * MiB)
            for mib in args.sizes:
                results[mib] = bench_size(root, mib, args, servers)
        finally:
            for s in servers.values():
                s.stop()
    rows = []
    for mib, res in results.items():
        base = res["raw_grpcio"]
        for name in ("crosslm", "crosslm_mtls", "raw_grpcio", "single_message"):
            m = res[name]
            rows.append([f"{mib} MiB {name}", m["upload_mib_s"], m["download_mib_s"],
                         ratio(m["upload_mib_s"], base["upload_mib_s"]), ratio(m["download_mib_s"], base["download_mib_s"]),
                         m["upload_cpu_ms_per_mib"], m["download_cpu_ms_per_mib"],
                         m["server_rss_growth_mib"], m["client_rss_growth_mib"]])
    print_table(["bundle / method", "up MiB/s", "down MiB/s", "up vs raw", "down vs raw", "up CPU ms/MiB",
                 "down CPU ms/MiB", "server RSS +MiB", "client RSS +MiB"], rows, title=f"transfer, chunk {args.chunk // 1024} KiB, best of {args.repeats}")
    top = results[max(results)]["ratios"]
    rss_by_size = {str(mib): res["ratios"]["rss_growth_mib"] for mib, res in results.items()}
    figures = {
        "upload_vs_raw": top["upload_vs_raw"],
        "download_vs_raw": top["download_vs_raw"],
        "vs_single_message": top["vs_single_message"],
        "rss_growth_mib": max(rss_by_size.values()),
        "mtls_vs_plain": min(top["mtls_vs_plain_upload"], top["mtls_vs_plain_download"]),
    }
    steadier = {k: top[k] for k in ("upload_vs_raw_cpu", "download_vs_raw_cpu", "mtls_vs_plain_upload",
                                    "mtls_vs_plain_download")}
    goals = {k: figures[k] >= v for k, v in GOALS.items()} | {"rss_growth_mib": figures["rss_growth_mib"] <= RSS_GOAL_MIB}
    for k, ok in goals.items():
        print(f"{k:<20} {figures[k]:>8}   goal {'<= ' + str(RSS_GOAL_MIB) if k == 'rss_growth_mib' else '>= ' + str(GOALS[k])}"
              f"   {'met' if ok else 'MISSED'}")
    emit_json({"script": "transfer", "quick": args.quick, "sizes_mib": args.sizes, "chunk_bytes": args.chunk,
               "repeats": args.repeats, **figures, **steadier, "rss_growth_mib_by_size": rss_by_size, "goals_met": goals,
               "by_size": {str(k): v for k, v in results.items()}, "malloc_tuned": malloc_tuned, "machine": machine(started_load=load0)}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
