"""`crosslm`: the engine's command line (simulate, study, results, certs)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from crosslm_shared.errors import CrossLMError

log = logging.getLogger("crosslm")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def setup_logging(verbose: bool, *, ml: bool = True) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not ml:  # commands that load no model need not pay for importing transformers
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)


def cmd_simulate(args: argparse.Namespace) -> int:
    from crosslm_server.config import load_config
    from crosslm_server.report import check_schema
    from crosslm_server.simulate import simulate

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
    from crosslm_server.study import ABLATIONS, run_study

    arms = [a.strip() for a in args.arms.split(",")] if args.arms else list(ABLATIONS)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    summary = run_study(args.config, Path(args.out), seeds=seeds, arms=arms, overrides=list(args.set or []))
    print(f"\nstudy: {Path(args.out) / 'study.md'}\n")
    print((Path(args.out) / "study.md").read_text())
    return EXIT_OK if summary["arms"]["crosslm"]["n"] else EXIT_ERROR


def cmd_results(args: argparse.Namespace) -> int:
    from crosslm_server.study import merge_results

    results = merge_results([Path(d) for d in args.studies], Path(args.out))
    print(json.dumps(results, indent=2))
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from crosslm_shared.certs import make_certs

    silos = [s.strip() for s in args.silos.split(",") if s.strip()]
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
    st.add_argument("--out", default="runs/study", help="output folder; rerun to resume (default: %(default)s)")
    st.add_argument("--seeds", type=int, default=3, help="number of seeds (default: %(default)s)")
    st.add_argument("--first-seed", type=int, default=0, help="first seed (default: %(default)s)")
    st.add_argument("--arms", default=None,
                    help="comma-separated arms (default: all: crosslm and every ablation); the baselines always run")
    st.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="config override for every arm")
    st.set_defaults(func=cmd_study)
    rs = sub.add_parser("results", help="merge finished studies' headline figures into one JSON per task")
    rs.add_argument("studies", nargs="+", help="study folders (each holds study.json)")
    rs.add_argument("--out", default="docs/results.json", help="JSON to update (default: %(default)s)")
    rs.set_defaults(func=cmd_results)
    ce = sub.add_parser("certs", help="make a CA, a server certificate and one client certificate per silo (mTLS)")
    ce.add_argument("--out", default="runs/certs", help="output folder (default: %(default)s)")
    ce.add_argument("--server-host", action="append", metavar="NAME",
                    help="DNS name or IP the silos dial, added to the server certificate (repeatable; "
                         "localhost and 127.0.0.1 are always included)")
    ce.add_argument("--silos", required=True, help="comma-separated silo names; each becomes a certificate's CN")
    ce.add_argument("--days", type=int, default=825, help="validity in days (default: %(default)s)")
    ce.add_argument("--force", action="store_true", help="replace an existing CA in --out (default: refuse)")
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
