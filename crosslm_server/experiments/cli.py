"""`crosslm`: the engine's command line (demo, simulate, study, results, map, certs)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from crosslm_shared.errors import CrossLMError

log = logging.getLogger("crosslm")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def setup_logging(verbose: bool, *, ml: bool = True) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not ml:  # commands that load no model need not pay for importing transformers
        return
    from crosslm_shared.logs import quiet_ml_logging

    quiet_ml_logging()


def cmd_simulate(args: argparse.Namespace) -> int:
    from crosslm_server.method.config import load_config
    from crosslm_server.experiments.report import check_schema
    from crosslm_server.experiments.simulate import simulate

    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.rounds is not None:
        overrides.append(f"rounds={args.rounds}")
    cfg = load_config(args.config, overrides)
    out = Path(args.out)
    log.info("simulating task %s: %d silos, %d rounds, seed %d -> %s", cfg.task, cfg.split.n_silos, cfg.rounds,
             cfg.seed, out)
    report = simulate(cfg, out, cache_dir=Path(args.cache) if args.cache else None)
    missing = check_schema(report)
    if missing:
        log.error("report lacks %s", missing)
        return EXIT_ERROR
    print(f"\nreport: {out / 'report.md'}\n        {out / 'report.json'}")
    print((out / "report.md").read_text())
    return EXIT_OK


def cmd_study(args: argparse.Namespace) -> int:
    from crosslm_server.experiments.study import ABLATIONS, run_study

    arms = [a.strip() for a in args.arms.split(",")] if args.arms else list(ABLATIONS)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    summary = run_study(args.config, Path(args.out), seeds=seeds, arms=arms, overrides=list(args.set or []),
                        cache_dir=Path(args.cache) if args.cache else None, run=not args.summary_only)
    print(f"\nstudy: {Path(args.out) / 'study.md'}\n")
    print((Path(args.out) / "study.md").read_text())
    if not summary["arms"]["crosslm"]["n"]:
        log.error("no crosslm run has finished in %s yet (seeds %s)", args.out, seeds)
        return EXIT_ERROR
    return EXIT_OK


def cmd_results(args: argparse.Namespace) -> int:
    from crosslm_server.experiments.study_summary import merge_results

    results = merge_results([Path(d) for d in args.studies], Path(args.out))
    print(json.dumps(results, indent=2))
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    from crosslm_server.experiments.regime_map import build_map

    cells = build_map([Path(d) for d in args.studies], Path(args.out),
                      results=Path(args.results) if args.results else None)
    print((Path(args.out) / "map.md").read_text())
    print(f"{len(cells)} cell(s): {Path(args.out) / 'map.json'}, map.md, map.png")
    return 0


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str) -> Path:
    """examples/NAME from the working directory, else from this checkout (an editable install)."""
    here = Path("examples") / name
    return here if here.exists() else EXAMPLES / name


def cmd_demo(args: argparse.Namespace) -> int:
    from crosslm_server.experiments.demo import DemoSettings, prepare
    from crosslm_server.experiments.demo_supervisor import run

    config = Path(args.config) if args.config else _example("demo-quick.toml" if args.quick else "demo.toml")
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    settings = DemoSettings(
        config=config, out=out, silos=args.silos, rounds=args.rounds,
        archs=tuple(a.strip() for a in args.archs.split(",") if a.strip()) if args.archs else (),
        llm_eval_texts=args.llm_eval_texts if args.llm_eval_texts is not None else (40 if args.quick else 100),
        llm_eval_docs=args.llm_eval_docs if args.llm_eval_docs is not None else (4 if args.quick else 10),
        continue_epochs=args.continue_epochs, sets=tuple(args.set or ()))
    print(f"CrossLM demo: engine config {config}, output {out}", flush=True)
    layout = prepare(settings)
    print(f"prepared {out}: certificates, private data and public test sets of {len(layout.archs)} silos "
          f"({', '.join(f'{n}: {a}' for n, a in layout.archs.items())}), server.toml and silo TOMLs", flush=True)
    return run(layout, timeout_s=args.timeout, echo=lambda line: print(line, flush=True))


def cmd_demo_report(args: argparse.Namespace) -> int:
    from crosslm_server.method.config import load_config
    from crosslm_server.experiments.demo import report_header
    from crosslm_server.experiments.demo_report import load_silo_reports, summary, write_demo_report
    from crosslm_shared.errors import DemoReportError
    from crosslm_shared.tasks import load_task

    dirs = {}
    for item in args.silos:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            log.error("%r: give each silo as NAME=FOLDER (its output_dir, holding reports/)", item)
            return EXIT_USAGE
        dirs[name] = Path(path)
    cfg = load_config(args.config, list(args.set or []))
    reports = {n: load_silo_reports(d) for n, d in dirs.items()}
    rounds = args.rounds or min(len(r) for r in reports.values())
    archs = {n: r[0]["arch"] if r else "?" for n, r in reports.items()}
    header = report_header(cfg, Path(args.config), load_task(cfg.task), demo={"silos": archs, "rounds": rounds})
    out = Path(args.out)
    try:
        report = write_demo_report(out, dirs, rounds=rounds, header=header)
    except DemoReportError as e:
        log.error("%s", e)
        return EXIT_ERROR
    print(summary(report))
    print(f"report: {out / 'report.md'}\n        {out / 'report.json'}")
    return EXIT_OK


def cmd_certs(args: argparse.Namespace) -> int:
    from crosslm_shared.certs import make_certs

    silos = [s.strip() for s in args.silos.split(",") if s.strip()]
    if args.if_missing and (Path(args.out) / "ca.pem").exists():
        print(f"certificates already in {args.out}: kept (delete the folder or use --force for new ones)")
        return EXIT_OK
    paths = make_certs(Path(args.out), server_hosts=args.server_host or [], silos=silos, days=args.days,
                       force=args.force)
    print(f"CA:     {paths.ca}  (give this file to every silo; keep ca.key offline)")
    print(f"server: {paths.server_cert}  {paths.server_key}")
    for silo, (cert, key) in paths.silos.items():
        print(f"silo {silo}: {cert}  {key}  (send only to silo {silo})")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crosslm", description="CrossLM: mutual enhancement of an LLM and silos' SLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    de = sub.add_parser("demo", help="run a server and four silo daemons as local processes over gRPC (mTLS), "
                                     "show their progress, write a report with plots")
    de.add_argument("--quick", action="store_true",
                    help="small counts on the same real models (examples/demo-quick.toml; about 4 minutes on 2 "
                         "CPU cores) instead of examples/demo.toml (about 15)")
    de.add_argument("--out", default=None, help="run folder, empty or absent (default: runs/demo-<date>-<time>)")
    de.add_argument("--config", default=None,
                    help="engine config: task, split, LLM, rounds, SLM selection (default: examples/demo.toml, "
                         "or examples/demo-quick.toml with --quick)")
    de.add_argument("--silos", type=int, default=4,
                    help="silo daemons, named silo-a, silo-b, ... (default: %(default)s)")
    de.add_argument("--archs", default=None,
                    help="comma-separated SLM architectures cycled over the silos: minilm, mpnet4, or a "
                         "module:attribute model family (default: the config's archs)")
    de.add_argument("--rounds", type=int, default=None, help="rounds per silo (default: the config's rounds)")
    de.add_argument("--llm-eval-texts", type=int, default=None,
                    help="zero-shot test texts per LLM measurement, 0 = all (default: 100, --quick 40)")
    de.add_argument("--llm-eval-docs", type=int, default=None,
                    help="general-corpus documents per perplexity measurement (default: 10, --quick 4)")
    de.add_argument("--continue-epochs", type=int, default=None,
                    help="epochs a silo continues a returned SLM on its private data and the returned synthetic "
                         "set, best epoch kept (default: the config's [round.slm] max_epochs, as the study)")
    de.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                    help="engine config override for the server and the split, e.g. --set round.update.gamma_kl=0")
    de.add_argument("--timeout", type=float, default=0,
                    help="stop everything and fail after this many seconds; 0 = never (default: %(default)s)")
    de.set_defaults(func=cmd_demo)
    dr = sub.add_parser("demo-report",
                        help="write a demo's report.json, report.md and plots from its silos' round reports "
                             "(what `crosslm demo` does at its end; the compose `report` service)")
    dr.add_argument("silos", nargs="+", metavar="NAME=FOLDER", help="each silo's output_dir (holding reports/)")
    dr.add_argument("--config", default="examples/demo.toml",
                    help="the engine config the server ran (default: %(default)s)")
    dr.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="the server's engine overrides")
    dr.add_argument("--rounds", type=int, default=None, help="rounds to report (default: what every silo finished)")
    dr.add_argument("--out", default="runs/demo-report", help="output folder (default: %(default)s)")
    dr.set_defaults(func=cmd_demo_report)
    sim = sub.add_parser("simulate", help="run N silos and R rounds in one process and write a report")
    sim.add_argument("--config", default="examples/rt-4silo.toml", help="TOML config (default: %(default)s)")
    sim.add_argument("--out", default="runs/simulate", help="output folder (default: %(default)s)")
    sim.add_argument("--seed", type=int, default=None, help="override the config's seed")
    sim.add_argument("--rounds", type=int, default=None, help="override the config's number of rounds")
    sim.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                     help="override any config value, e.g. --set round.update.gamma_kl=0 (repeatable)")
    sim.add_argument("--cache", default=None, metavar="DIR",
                     help="reuse silo-only SLMs, judge, LLM 'before' figures and ZeroGen from DIR (default: none)")
    sim.set_defaults(func=cmd_simulate)
    st = sub.add_parser("study", help="run every arm over several seeds (resumable) and compare with intervals")
    st.add_argument("--config", default="examples/rt-4silo.toml", help="TOML config (default: %(default)s)")
    st.add_argument("--out", default="runs/study", help="output folder; rerun to resume; several processes may share it, "
                    "each takes the runs no other is running (default: %(default)s)")
    st.add_argument("--seeds", type=int, default=3, help="number of seeds (default: %(default)s)")
    st.add_argument("--first-seed", type=int, default=0, help="first seed (default: %(default)s)")
    st.add_argument("--arms", default=None,
                    help="comma-separated arms (default: all: crosslm and every ablation); the baselines always run")
    st.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="config override for every arm")
    st.add_argument("--cache", default=None, metavar="DIR",
                    help="where the baselines are cached (default: OUT/cache); a study of the same task and "
                         "splits with other overrides can share another study's")
    st.add_argument("--summary-only", action="store_true",
                    help="run nothing: write study.json, study.md and the plots from the runs that have finished")
    st.set_defaults(func=cmd_study)
    rs = sub.add_parser("results", help="merge finished studies' headline figures into one JSON per task")
    rs.add_argument("studies", nargs="+", help="study folders (each holds study.json)")
    rs.add_argument("--out", default="docs/results.json", help="JSON to update (default: %(default)s)")
    rs.set_defaults(func=cmd_results)
    mp = sub.add_parser("map", help="the regime map: one cell per finished study, placed by the silos' margin "
                                    "over the LLM's zero-shot; gains, LLM figures and goals per cell")
    mp.add_argument("studies", nargs="+", help="study folders (each holds study.json and its runs' reports)")
    mp.add_argument("--out", default="docs/runs/map", help="folder for map.json, map.md, map.png "
                                                           "(default: %(default)s)")
    mp.add_argument("--results", default=None, help="also write the cells into this results JSON's \"map\" "
                                                    "(e.g. docs/results.json)")
    mp.set_defaults(func=cmd_map)
    ce = sub.add_parser("certs", help="make a CA, a server certificate and one client certificate per silo (mTLS)")
    ce.add_argument("--out", default="runs/certs", help="output folder (default: %(default)s)")
    ce.add_argument("--server-host", action="append", metavar="NAME",
                    help="DNS name or IP the silos dial, added to the server certificate (repeatable; "
                         "localhost and 127.0.0.1 are always included)")
    ce.add_argument("--silos", required=True, help="comma-separated silo names; each becomes a certificate's CN")
    ce.add_argument("--days", type=int, default=825, help="validity in days (default: %(default)s)")
    ce.add_argument("--force", action="store_true", help="replace an existing CA in --out (default: refuse)")
    ce.add_argument("--if-missing", action="store_true",
                    help="when --out already holds a CA, keep every file and exit 0 (a compose one-shot that "
                         "runs again; default: refuse)")
    ce.set_defaults(func=cmd_certs, ml=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, ml=getattr(args, "ml", True))
    try:
        return args.func(args)
    except CrossLMError as e:
        log.error("%s", e)
        return EXIT_USAGE
    except KeyboardInterrupt:
        log.warning("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
