#!/usr/bin/env python3
"""Scale-out: rounds per hour with 2 workers over 1, and submit-to-ready latency, SQLite in one
process vs PostgreSQL with front-end and workers apart, on the same work.

    .venv/bin/python benchmarks/scaleout.py [--quick] [--rounds-per-task 6] [--step-seconds 0.5]

The same work in three shapes, one after another in this run: `single` (`crosslm-server serve`
with its built-in worker on SQLite, the default), `pg-1w` and `pg-2w` (`serve --no-worker` plus
one or two `crosslm-server worker` processes on a PostgreSQL server this script starts, a fresh
database each). The work: two tasks (rt, rt2), `--rounds-per-task` submissions each, one silo per
submission, every upload done first, then every submission at once. The engine is the tests'
tiny engine (tests/fakes/tiny_engine.py): its round sleeps `--step-seconds` five times (steps of generation, LLM and SLM training), a
stand-in for GPU time that one worker spends and two spend in parallel, plus a little CPU
(tiny models). Rounds of one task run one after another in every shape, so two workers can at
best double the rate of two tasks.

Figures: `rounds_per_hour` from the first submit to the last `ready` (event times in the
store); latency from a submission's first `queued` event to its `ready` event, p50 and p99
(nearest rank, so p99 is the slowest of a few dozen). Ratios: `pg_2w_over_1w` (goal >= 1.8)
and each shape's p50 over the single process's.
"""
from __future__ import annotations

import sys
from pathlib import Path

from _common import base_parser, emit_json, load_avg, machine, percentile, print_table, ratio, workdir

GOAL = 1.8


def parse_args(argv: list[str] | None = None):
    p = base_parser(__doc__)
    p.add_argument("--rounds-per-task", type=int, default=None, help="submissions per task (default 6, --quick 3)")
    p.add_argument("--step-seconds", type=float, default=0.5, help="tiny engine's sleep per step (default 0.5)")
    args = p.parse_args(argv)
    if args.rounds_per_task is None:
        args.rounds_per_task = 3 if args.quick else 6
    if args.rounds_per_task < 1:
        p.error(f"--rounds-per-task={args.rounds_per_task}: must be >= 1")
    return args


def run_shape(root: Path, dsn: str, *, workers: int, builtin: bool, per_task: int, step_s: float) -> dict:
    from scale_helpers import TASKS, front_end, wait_for, worker, write_config
    from service_helpers import LABELS, tiny_bundle
    from crosslm_client.transport import CrossLMClient
    from crosslm_shared.bundle import make_manifest
    from crosslm_server.service.config import load_server_config
    from crosslm_server.service.serve import open_store

    path = write_config(root, dsn, step_seconds=step_s, builtin=builtin, lease_s=30.0, heartbeat_s=5.0, poll_s=0.1,
                        store="sqlite" if builtin else "postgres")
    procs = [front_end(path) if not builtin else _serve(path)]
    procs += [worker(path, f"w{i + 1}") for i in range(workers)]
    store = None
    try:
        for p in procs:
            p.start()
        fe = procs[0]
        jobs = [(f"s{task}{i}", task) for task in TASKS for i in range(per_task)]
        jobs.sort(key=lambda j: j[0][-1])  # interleave the tasks in the queue: rt0, rt20, rt1, ...
        uploads = []
        for k, (silo, task) in enumerate(jobs):
            folder, _ = tiny_bundle(root / "silos" / silo, silo=silo, seed=k)
            manifest = make_manifest(folder, task=task, silo=silo, arch="tiny", labels=LABELS, temperature=1.0,
                                     heldout_accuracy=0.5)
            with CrossLMClient(fe.address, silo) as client:
                client.upload(folder, manifest, f"{silo}-upload-0")
            uploads.append(silo)
        subs = []
        for silo in uploads:
            with CrossLMClient(fe.address, silo) as client:
                subs.append(client.submit(f"{silo}-upload-0").submission_id)
        store = open_store(load_server_config(path))
        wait_for(lambda: all(store.get_submission(s).terminal for s in subs), timeout_s=3600, every_s=0.5,
                 what="every round")
        failed = [s for s in subs if store.get_submission(s).stage != "ready"]
        if failed:
            raise RuntimeError(f"{len(failed)} rounds failed, e.g. {store.get_submission(failed[0]).error}")
        spans = []
        for sid in subs:
            events = store.events_after(sid, 0)
            queued = next(e.time for e in events if e.kind == "queued")
            ready = next(e.time for e in events if e.kind == "ready")
            spans.append((queued, ready))
        wall = max(r for _, r in spans) - min(q for q, _ in spans)
        latencies = [r - q for q, r in spans]
        return {"rounds": len(subs), "wall_s": round(wall, 2), "rounds_per_hour": round(3600 * len(subs) / wall, 1),
                "latency_p50_s": round(percentile(latencies, 50), 2), "latency_p99_s": round(percentile(latencies, 99), 2)}
    finally:
        for p in procs:
            p.stop()
        if store is not None:
            store.close()


def _serve(path: Path):
    from scale_helpers import Proc

    return Proc(path, "serve", "single")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pg_server import PostgresServer

    started = load_avg()
    with workdir(args.workdir, "crosslm-scaleout-") as root:
        pg = PostgresServer().start()
        try:
            shapes = {}
            for name, workers, builtin in (("single", 0, True), ("pg-1w", 1, False), ("pg-2w", 2, False)):
                dsn = pg.create_database() if not builtin else ""
                shapes[name] = run_shape(root / name, dsn, workers=workers, builtin=builtin,
                                         per_task=args.rounds_per_task, step_s=args.step_seconds)
                print(f"{name}: {shapes[name]}", file=sys.stderr)
        finally:
            pg.stop()
    base = shapes["single"]["latency_p50_s"]
    rows = [[name, s["rounds"], s["wall_s"], s["rounds_per_hour"], s["latency_p50_s"], s["latency_p99_s"],
             ratio(s["latency_p50_s"], base)] for name, s in shapes.items()]
    print_table(["shape", "rounds", "wall s", "rounds/h", "p50 s", "p99 s", "p50 / single"], rows,
                title=f"two tasks x {args.rounds_per_task} rounds, tiny engine {args.step_seconds} s per step")
    speedup = ratio(shapes["pg-2w"]["rounds_per_hour"], shapes["pg-1w"]["rounds_per_hour"])
    print(f"rounds per hour, 2 workers over 1: {speedup} (goal >= {GOAL})")
    emit_json({"benchmark": "scaleout", "machine": machine(started_load=started), "rounds_per_task": args.rounds_per_task,
               "step_seconds": args.step_seconds, "shapes": shapes, "pg_2w_over_1w": speedup, "goal": GOAL,
               "met": speedup >= GOAL,
               "p50_over_single": {n: ratio(s["latency_p50_s"], base) for n, s in shapes.items()},
               "p99_over_single": {n: ratio(s["latency_p99_s"], shapes["single"]["latency_p99_s"])
                                   for n, s in shapes.items()}}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
