"""`crosslm-server`: run the CrossLM server (`serve`), or its front-ends and workers apart (`serve`
with `[worker] builtin = false`, `worker`); list and roll back its LLM adapter versions.

Exit codes: 0 clean stop, 2 bad config or flags, 1 any other failure.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import logging
import sys
from pathlib import Path

from crosslm_shared.errors import CrossLMError
from crosslm_server.service.config import ServerSection, load_server_config
from crosslm_shared.schema import flag_help
from crosslm_server.service.serve import serve


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crosslm-server", description="CrossLM server: gRPC service, worker, HTTP.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="run the server until SIGTERM / Ctrl-C")
    run.add_argument("--config", type=Path, required=True,
                     help="server TOML file (examples/server.toml; every key: docs/config.md)")
    run.add_argument("--grpc-port", type=int, default=None, help=flag_help(ServerSection, "server", "grpc_port"))
    run.add_argument("--http-port", type=int, default=None, help=flag_help(ServerSection, "server", "http_port"))
    run.add_argument("--data-dir", type=str, default=None, help=flag_help(ServerSection, "server", "data_dir"))
    run.add_argument("--engine", type=str, default=None,
                     help="override [engine] name; the file's [engine.options] are dropped when it differs")
    run.add_argument("--tls-cert", type=str, default=None, help=flag_help(ServerSection, "server", "tls_cert"))
    run.add_argument("--tls-key", type=str, default=None, help=flag_help(ServerSection, "server", "tls_key"))
    run.add_argument("--tls-ca", type=str, default=None, help=flag_help(ServerSection, "server", "tls_ca"))
    run.add_argument("--plaintext-dev", action="store_true",
                     help="no TLS, silos named by a header: a local demo only, never reachable by others "
                          "(default: mTLS as the file says)")
    run.add_argument("--no-worker", action="store_true",
                     help="a front-end only: no engine, no round (sets [worker] builtin = false; needs "
                          "[store] kind = 'postgres' and `crosslm-server worker` processes; default: from file)")
    wk = sub.add_parser("worker", help="claim and run rounds from the shared PostgreSQL store until SIGTERM")
    wk.add_argument("--config", type=Path, required=True, help="server TOML file with [store] kind = 'postgres'")
    wk.add_argument("--data-dir", type=str, default=None,
                    help="override [server] data_dir, the folder shared with the front-ends (default: from file)")
    wk.add_argument("--engine", type=str, default=None,
                    help="override [engine] name; the file's [engine.options] are dropped when it differs")
    wk.add_argument("--name", type=str, default=None, help="override [worker] name (default: from file, else host:pid)")
    wk.add_argument("--http-port", type=int, default=None,
                    help="override [worker] http_port of /healthz /readyz /metrics (default: from file)")
    ad = sub.add_parser("adapters", help="list or roll back the LLM adapter versions (one per applied round)")
    ad_sub = ad.add_subparsers(dest="action", required=True)
    for name, help_ in (("list", "list the versions, marking the current one"),
                        ("rollback", "make version N current (a running server uses it from its next round)")):
        a = ad_sub.add_parser(name, help=help_)
        a.add_argument("--config", type=Path, required=True, help="server TOML file")
        a.add_argument("--data-dir", type=str, default=None, help=flag_help(ServerSection, "server", "data_dir"))
        if name == "rollback":
            a.add_argument("version", type=int, help="the version to make current")
    return p


def _adapters(args, config) -> int:
    from crosslm_server.engines.adapters import AdapterStore

    store = AdapterStore(config.engine.options.get("adapters_dir") or Path(config.server.data_dir) / "adapters")
    if args.action == "rollback":
        v = store.rollback(args.version)
        print(f"adapter version {v.version} is current ({v.path})")
        return 0
    current = store.current()
    versions = store.versions()
    if not versions:
        print(f"no adapter versions in {store.root}")
    for v in versions:
        mark = "*" if current and v.version == current.version else " "
        m = v.meta.get("metrics", {})
        print(f"{mark} v{v.version:<5} silo {v.meta.get('silo', '?'):<10} submission {v.meta.get('submission_id', '?')} "
              f"kept {m.get('kept', '?')} kl {m.get('kl', float('nan')):.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
        if args.command == "adapters":
            config = load_server_config(args.config, overrides={"server": {"data_dir": data_dir}})
            return _adapters(args, config)
        if args.command == "worker":
            config = load_server_config(args.config, overrides={
                "server": {"data_dir": data_dir}, "engine": {"name": args.engine},
                "worker": {"name": args.name, "http_port": args.http_port}})
            config.require_shared_store("`crosslm-server worker`")
        else:
            tls = {key: str(Path(value).resolve()) if value else None
                   for key, value in (("tls_cert", args.tls_cert), ("tls_key", args.tls_key), ("tls_ca", args.tls_ca))}
            config = load_server_config(args.config, overrides={
                "server": {"grpc_port": args.grpc_port, "http_port": args.http_port, "data_dir": data_dir,
                           "plaintext_dev_mode": True if args.plaintext_dev else None, **tls},
                "engine": {"name": args.engine}, "worker": {"builtin": False if args.no_worker else None}})
            config.server.require_tls()
        if args.engine and args.engine != load_server_config(args.config).engine.name:
            config = replace(config, engine=replace(config.engine, options={}))
    except CrossLMError as e:
        print(f"crosslm-server: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.server.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.engine.name == "crosslm":
        from crosslm_shared.logs import quiet_ml_logging

        quiet_ml_logging()
    try:
        if args.command == "worker":
            from crosslm_server.service.workerproc import run_worker

            return run_worker(config)
        return serve(config)
    except CrossLMError as e:
        logging.getLogger("crosslm_server").error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
