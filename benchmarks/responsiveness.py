#!/usr/bin/env python3
"""Does the server stay responsive while a round runs? Health latency and upload throughput,
idle against busy, in the same run.

    .venv/bin/python benchmarks/responsiveness.py [--quick] [--set round.generate.per_label=8 ...]

One `crosslm-server serve` process over mTLS with the real `crosslm` engine: SmolLM2-135M and
the `[llm]`/`[round.*]` settings of examples/rt-4silo.toml (the demo's round; `--set` changes
them). A probe process of its own sends, at 20 Hz each, GET /healthz (one kept-alive
connection) and grpc.health.v1 Check (one mTLS channel).

1. idle: the LLM loaded, nothing running, `--idle-s` seconds of probes, then `--uploads`
   uploads of a `--upload-mib` bundle by another silo, one after the other;
2. busy: silo-a submits a MiniLM SLM (fresh head: its accuracy does not change the cost) and,
   while its round runs, the other silo uploads the same bundle every few seconds. The busy
   window is the whole round, or its first `--busy-s` seconds (--quick: 60 s, so it fits in
   3 minutes on 2 cores: the window then covers generation and what follows within it).
Probes that overlap an upload are left out of both windows, so latency figures compare the
round's effect only. Ratios: busy p99 against the 20 ms goal and against idle; busy upload
throughput (median) over idle (median). Also the server's run-queue wait (schedstat: seconds
its threads were runnable but had no CPU) per second of each window.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from crosslm_shared.records import TERMINAL_EVENTS, EventKind
from _common import (HERE, MiB, REPO, base_parser, big_bundle, emit_json, load_avg, machine, percentile,
                     print_table, ratio, runqueue_wait_s, server_keys, start_server, workdir)

P99_GOAL_MS = 20.0
UPLOAD_GOAL = 0.8


def parse_args(argv: list[str] | None = None):
    p = base_parser(__doc__)
    p.add_argument("--config", type=Path, default=REPO / "examples" / "rt-4silo.toml",
                   help="simulate-style TOML whose [llm] and [round.*] the engine uses (read, never changed)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="engine override such as round.generate.per_label=8 (repeatable)")
    p.add_argument("--idle-s", type=float, default=None, help="idle probing seconds (default 30, quick 10)")
    p.add_argument("--busy-s", type=float, default=None,
                   help="busy window: the round's first N seconds (default: the whole round; quick 60)")
    p.add_argument("--upload-mib", type=int, default=None, help="upload size in MiB (default 64, quick 32)")
    p.add_argument("--uploads", type=int, default=3, help="uploads idle, and at least this many tried busy")
    p.add_argument("--hz", type=float, default=20.0, help="probes per second of each kind")
    p.add_argument("--engine-threads", type=int, default=0,
                   help="[engine.options] threads: torch threads for the round (default 0: torch's choice)")
    p.add_argument("--server-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a [server] key for this run, e.g. worker_nice=0 (repeatable; value as TOML)")
    args = p.parse_args(argv)
    args.set = args.set or []
    args.busy_s = args.busy_s or (60.0 if args.quick else None)
    args.idle_s = args.idle_s or (10.0 if args.quick else 30.0)
    args.upload_mib = args.upload_mib or (32 if args.quick else 64)
    return args


def slm_bundle(root: Path, silo: str):
    """A MiniLM classifier with a fresh head for the task, as a silo would send it."""
    from crosslm_shared.bundle import make_manifest
    from crosslm_shared.slm import new_slm
    from crosslm_shared.tasks import load_task
    task = load_task("rotten_tomatoes")
    folder = new_slm("minilm", task.label_names).save(root / f"slm-{silo}")
    return folder, make_manifest(folder, task=task.name, silo=silo, arch="minilm", labels=tuple(task.label_names),
                                 temperature=1.0, heldout_accuracy=0.5)


class Uploader:
    """The other silo's uploads; records each one's wall-clock span and throughput."""

    def __init__(self, server, root: Path, mib: int):
        self.folder, self.manifest = big_bundle(root, mib, silo="probe-up")
        self.server, self.n = server, 0
        self.spans: list[tuple[float, float, str]] = []
        self.rates: dict[str, list[float]] = {"idle": [], "busy": []}

    def upload(self, phase: str) -> None:
        with self.server.client("probe-up") as client:
            grpc.channel_ready_future(client.channel).result(timeout=60)
            t0, w0 = time.perf_counter(), time.time()
            client.upload(self.folder, self.manifest, f"probe-up-{self.n:04d}")
            dt = time.perf_counter() - t0
        self.n += 1
        self.spans.append((w0, time.time(), phase))
        self.rates[phase].append(self.manifest.total_size / MiB / dt)


def latency_stats(samples: list[dict]) -> dict:
    ms = [s["ms"] for s in samples if s["ok"]]
    return {"n": len(samples), "failed": sum(not s["ok"] for s in samples), "p50_ms": round(percentile(ms, 50), 2),
            "p99_ms": round(percentile(ms, 99), 2), "max_ms": round(max(ms), 1) if ms else float("nan")}


def in_window(t: float, window: tuple[float, float], spans, margin: float = 0.25) -> bool:
    return window[0] <= t <= window[1] and not any(a - margin <= t <= b + margin for a, b, _ in spans)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load0 = load_avg()
    events: list[tuple[float, str]] = []
    wait: dict[str, float] = {}
    with workdir(args.workdir, "crosslm-responsiveness-") as root:
        options = {"config": str(args.config.resolve()), "tasks": ["rotten_tomatoes"], "set": list(args.set),
                   "threads": args.engine_threads}
        t_load = time.perf_counter()
        server = start_server(root, engine="crosslm", engine_options=options, tls=True,
                              silos=["silo-a", "probe-up", "probe"], profile=args.profile, ready_timeout=900,
                              server={"grace_s": 1.0} | server_keys(args.server_set))
        load_s = time.perf_counter() - t_load
        probe = None
        try:
            folder, manifest = slm_bundle(root, "silo-a")
            uploader = Uploader(server, root, args.upload_mib)
            client = server.client("silo-a")
            client.upload(folder, manifest, "silo-a-round-0001")
            cert, key = server.certs.silos["probe"]
            probe_out = root / "probes.jsonl"
            probe = subprocess.Popen([sys.executable, str(HERE / "_probe.py"), "--http-port", str(server.http_port),
                                      "--grpc-port", str(server.grpc_port), "--ca", str(server.certs.ca),
                                      "--cert", str(cert), "--key", str(key), "--hz", str(args.hz),
                                      "--out", str(probe_out)])
            time.sleep(2.0)  # the probe's channel and connection are up
            idle = (time.time(), 0.0)
            wait0 = runqueue_wait_s(server.pid)
            time.sleep(args.idle_s)
            wait["idle"] = (runqueue_wait_s(server.pid) - wait0) / (time.time() - idle[0])
            for _ in range(args.uploads):
                uploader.upload("idle")
            idle = (idle[0], time.time())

            sub = client.submit("silo-a-round-0001")
            done = threading.Event()

            def watch() -> None:
                for e in client.watch(sub.submission_id):
                    events.append((time.time(), e.kind))
                done.set()
            threading.Thread(target=watch, daemon=True).start()
            while not any(k == EventKind.STARTED for _, k in events) and not done.is_set():
                time.sleep(0.05)
            busy_start, wait0 = time.time(), runqueue_wait_s(server.pid)
            deadline = busy_start + (args.busy_s or float("inf"))
            gap = 4.0
            while not done.wait(gap) and time.time() + gap < deadline:
                uploader.upload("busy")
            done.wait(max(0.0, deadline - time.time()))
            busy = (busy_start, next((t for t, k in events if k in TERMINAL_EVENTS), time.time()))
            wait["busy"] = (runqueue_wait_s(server.pid) - wait0) / (busy[1] - busy[0])
            client.close()
        finally:
            if probe is not None:
                probe.terminate()
                probe.wait(30)
            server.stop()
        samples = [json.loads(line) for line in probe_out.read_text().splitlines() if line.strip()]
    outcome = events[-1][1] if events else "none"
    if outcome == EventKind.FAILED or not any(k == EventKind.STARTED for _, k in events):
        raise SystemExit(f"the round failed or never started: {events}")
    spans = uploader.spans
    stats: dict[str, dict] = {}
    for kind in ("http", "grpc"):
        for phase, window in (("idle", idle), ("busy", busy)):
            stats[f"{kind}_{phase}"] = latency_stats([s for s in samples if s["kind"] == kind
                                                      and in_window(s["t"], window, spans)])
    # the probes between one kind of engine event and the next (engines report a step when it
    # ends: the window after "scoring" holds scoring, filtering and the first LoRA step)
    stages = []
    marks = [(t, k) for t, k in events if k != EventKind.QUEUED]
    for (t0, k), (t1, _) in zip(marks, marks[1:] + [(busy[1], "")]):
        k = EventKind.GENERATING if k == EventKind.STARTED else k
        if stages and stages[-1][0] == k:
            stages[-1] = (k, stages[-1][1], t1)
        else:
            stages.append((k, t0, t1))
    by_stage = {k: latency_stats([s for s in samples if in_window(s["t"], (a, b), spans)]) for k, a, b in stages}
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")  # noqa: E731
    up_idle, up_busy = med(uploader.rates["idle"]), med(uploader.rates["busy"])
    rows = [[f"{kind} {phase}", st["n"], st["failed"], st["p50_ms"], st["p99_ms"], st["max_ms"]]
            for kind_phase, st in stats.items() for kind, phase in [kind_phase.split("_")]]
    rows += [[f"busy, after {k}", st["n"], st["failed"], st["p50_ms"], st["p99_ms"], st["max_ms"]] for k, st in by_stage.items()]
    print_table(["probe", "n", "failed", "p50 ms", "p99 ms", "max ms"], rows,
                title=f"health latency, idle vs a round ({busy[1] - busy[0]:.0f} s busy, settings {args.set or 'rt-4silo'})")
    print(f"server run-queue wait (threads runnable, no CPU free): idle {wait['idle']:.3f} s/s, "
          f"busy {wait['busy']:.3f} s/s; the round {'finished' if outcome == EventKind.READY else 'was cut at the window end'}\n")
    print_table(["upload", "runs", "median MiB/s", "vs idle"],
                [["idle", len(uploader.rates["idle"]), up_idle, 1.0],
                 ["busy", len(uploader.rates["busy"]), up_busy, ratio(up_busy, up_idle)]])
    p99_busy = max(stats["http_busy"]["p99_ms"], stats["grpc_busy"]["p99_ms"])
    figures = {"p99_busy_ms": p99_busy,
               "p99_busy_vs_goal": ratio(p99_busy, P99_GOAL_MS),
               "http_p99_busy_vs_idle": ratio(stats["http_busy"]["p99_ms"], stats["http_idle"]["p99_ms"]),
               "grpc_p99_busy_vs_idle": ratio(stats["grpc_busy"]["p99_ms"], stats["grpc_idle"]["p99_ms"]),
               "upload_busy_vs_idle": ratio(up_busy, up_idle),
               "probe_failures": sum(st["failed"] for st in stats.values())}
    goals = {"p99_busy_ms<=20": p99_busy <= P99_GOAL_MS, "upload_busy_vs_idle>=0.8": figures["upload_busy_vs_idle"] >= UPLOAD_GOAL}
    for k, ok in goals.items():
        print(f"{k:<28} {'met' if ok else 'MISSED'}")
    emit_json({"script": "responsiveness", "quick": args.quick, "engine": "crosslm", "set": args.set,
               "server_set": args.server_set, "engine_threads": args.engine_threads, **figures,
               "goals_met": goals, "latency": stats, "latency_by_stage": by_stage,
               "upload_mib": args.upload_mib, "upload_mib_s": {"idle": uploader.rates["idle"], "busy": uploader.rates["busy"]},
               "busy_window_s": round(busy[1] - busy[0], 1), "round_finished": outcome == EventKind.READY,
               "runqueue_wait_s_per_s": {k: round(v, 3) for k, v in wait.items()}, "server_start_s": round(load_s, 1),
               "machine": machine(started_load=load0)}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
