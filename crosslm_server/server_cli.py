"""`crosslm-server`: run the CrossLM server.

Exit codes: 0 clean stop, 2 bad config or flags, 1 any other failure.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from crosslm_shared.errors import CrossLMError
from crosslm_server.server_config import load_server_config
from crosslm_server.serve import serve


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crosslm-server", description="CrossLM server: gRPC service, worker, HTTP.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="run the server until SIGTERM / Ctrl-C")
    run.add_argument("--config", type=Path, required=True, help="server TOML file (see examples/server.toml)")
    run.add_argument("--grpc-port", type=int, default=None, help="override [server] grpc_port (default: from file)")
    run.add_argument("--http-port", type=int, default=None, help="override [server] http_port (default: from file)")
    run.add_argument("--data-dir", type=str, default=None, help="override [server] data_dir (default: from file)")
    run.add_argument("--engine", type=str, default=None, help="override [engine] name (default: from file)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
        config = load_server_config(args.config, overrides={
            "server": {"grpc_port": args.grpc_port, "http_port": args.http_port, "data_dir": data_dir},
            "engine": {"name": args.engine}})
    except CrossLMError as e:
        print(f"crosslm-server: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.server.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve(config)
    except CrossLMError as e:
        logging.getLogger("crosslm_server").error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
