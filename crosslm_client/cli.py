"""`crosslm-client`: the silo daemon.

Exit codes: 0 all rounds ran, 2 bad config or data, 3 authentication / permission refused,
4 the server could not be reached or refused a request, 5 a model package is missing,
6 the silo's privacy policy refused to train or send (ε budget spent, or audit AUC over its bound),
130 stopped by SIGINT (Ctrl-C) or SIGTERM.
`check`: 0 when every check is OK, 1 when any failed. `audit`: 0, or 6 when the AUC exceeds [audit] max_auc.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from crosslm_client.config import RoundsSection, ServerSection, load_silo_config
from crosslm_shared.schema import flag_help
from crosslm_client.transport import FATAL_AUTH, TransportError
from crosslm_shared.errors import AssetMissingError, ConfigError, CrossLMError, DataError, PrivacyError

log = logging.getLogger("crosslm_client")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crosslm-client", description="CrossLM silo daemon.")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging level (default: INFO)")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train, upload, wait for the enhanced SLM, evaluate; repeat")
    r.add_argument("--config", type=Path, required=True, help="silo TOML file (examples/silo-a.toml; every key: docs/config.md)")
    r.add_argument("--server", default=None, help=flag_help(ServerSection, "server", "address"))
    r.add_argument("--rounds", type=int, default=None, help=flag_help(RoundsSection, "rounds", "count"))
    c = sub.add_parser("check", help="check certificate, key, CA, server address and data file; say what to fix")
    c.add_argument("--config", type=Path, required=True, help="silo TOML file (examples/silo-a.toml; every key: docs/config.md)")
    c.add_argument("--server", default=None, help=flag_help(ServerSection, "server", "address"))
    a = sub.add_parser("audit", help="membership-inference audit of the silo's latest kept model (members: its "
                                     "training split; non-members: its held-out split); prints JSON")
    a.add_argument("--config", type=Path, required=True, help="silo TOML file (examples/silo-a.toml; every key: docs/config.md)")
    a.add_argument("--model", type=Path, default=None,
                   help="model folder to audit (default: the latest under OUTPUT_DIR/models)")
    a.add_argument("--out", type=Path, default=None, help="also write the JSON here (default: stdout only)")
    d = sub.add_parser("prepare-demo", help="write demo silos' private CSV files and the public test files "
                                            "from a task's offline dataset")
    d.add_argument("--task", default="rotten_tomatoes", help="built-in task name or task TOML (default: rotten_tomatoes)")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for silo-a.csv ... (default: runs/demo)")
    d.add_argument("--public-out", type=Path, default=None,
                   help="folder for the public test files silo-a-test.csv ... and llm-test.csv (default: OUT/public)")
    d.add_argument("--silos", type=int, default=4, help="number of silos (default: 4)")
    d.add_argument("--n-private", type=int, default=128, help="private examples per silo (default: 128)")
    d.add_argument("--n-test", type=int, default=300,
                   help="test examples per silo, reporting only; 0 = none (default: 300)")
    d.add_argument("--n-llm-test", type=int, default=400, help="the LLM's zero-shot test set; 0 = none (default: 400)")
    d.add_argument("--n-judge", type=int, default=1000,
                   help="examples set aside for an independent judge, written nowhere; kept so the cut equals "
                        "`crosslm simulate`'s (default: 1000)")
    d.add_argument("--partition", choices=["dirichlet", "iid"], default="dirichlet",
                   help="label-skewed (dirichlet) or iid private shares (default: dirichlet)")
    d.add_argument("--alpha", type=float, default=0.5,
                   help="Dirichlet concentration; smaller = more skew (default: 0.5)")
    d.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
    return p


def _stop(signum, frame):
    """SIGTERM ends the daemon like Ctrl-C: open streams close, files already written stay whole."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "prepare-demo":
        return _prepare_demo(args)
    if args.command == "check":
        return _check(args)
    if args.command == "audit":
        return _audit(args)
    # SIGTERM is answered before the daemon imports torch: a daemon stopped while it starts
    # exits 130 with its log line, like one stopped mid-round
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if in_main else None
    try:
        from crosslm_client.daemon import run
        from crosslm_shared.logs import quiet_ml_logging
        from crosslm_shared.transfer import tune_malloc_for_chunks

        quiet_ml_logging()
        tune_malloc_for_chunks()
        config = load_silo_config(args.config, overrides={"server": {"address": args.server},
                                                          "rounds": {"count": args.rounds}})
        reports = run(config)
    except KeyboardInterrupt:
        log.warning("stopped; a restart resumes the current round's upload")
        return 130
    except (ConfigError, DataError) as e:
        log.error("%s", e)
        return 2
    except TransportError as e:
        log.error("%s", e)
        return 3 if e.code in FATAL_AUTH else 4
    except AssetMissingError as e:
        log.error("%s", e)
        return 5
    except PrivacyError as e:
        log.error("%s", e)
        return 6
    except CrossLMError as e:
        log.error("%s", e)
        return 4
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    log.info("done: %d round(s); reports in %s", len(reports), config.output_dir / "reports")
    return 0


def _check(args) -> int:
    from crosslm_client.check import run_checks

    results = run_checks(args.config, address=args.server)
    for result in results:
        print(result.line())
    failed = [r.name for r in results if r.status == "FAIL"]
    print("all checks passed" if not failed else f"to fix: {', '.join(failed)}")
    return 1 if failed else 0


def _refused_before_start(e: CrossLMError) -> int:
    """Exit code 2 for bad config or data, 5 for a missing model package (the module docstring)."""
    log.error("%s", e)
    return 5 if isinstance(e, AssetMissingError) else 2


def _audit(args) -> int:
    import json

    from crosslm_client import models
    from crosslm_client.daemon import private_split
    from crosslm_client.privacy import audit_model, latest_model_dir

    try:
        config = load_silo_config(args.config)
        s = config.silo
        _, train, held = private_split(config)  # the daemon's split: members = its training records
        folder = args.model or latest_model_dir(config)
        result = {"silo": s.name, "model": str(folder),
                  **audit_model(config, models.family(config).load(config, folder), train, held)}
    except (ConfigError, DataError, AssetMissingError) as e:
        return _refused_before_start(e)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    bound = config.audit.max_auc
    if bound is not None and result["auc"] > bound:
        log.error("silo %s: audit AUC %.3f exceeds [audit] max_auc = %g: the daemon would not send this model",
                  s.name, result["auc"], bound)
        return 6
    return 0


def _prepare_demo(args) -> int:
    from crosslm_shared.demo_data import prepare_demo
    from crosslm_shared.data import SplitConfig

    try:
        split = SplitConfig(n_silos=args.silos, n_private=args.n_private, n_test=args.n_test,
                            n_llm_test=args.n_llm_test, n_judge=args.n_judge, partition=args.partition,
                            alpha=args.alpha)
        paths = prepare_demo(args.task, args.out, split=split, seed=args.seed, public_out=args.public_out)
    except (ConfigError, DataError, AssetMissingError) as e:
        return _refused_before_start(e)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
