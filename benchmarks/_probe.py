"""Health probes for benchmarks/responsiveness.py, in a process of their own (so the latency
measured is the server's, not this side's GIL). Until SIGTERM, alternately: GET /healthz on
one kept-alive HTTP connection, and grpc.health.v1 Check("") on one channel (mTLS when given
certificates). One JSON line per probe: {"t": wall clock, "kind": "http"|"grpc", "ms", "ok"}.

    python benchmarks/_probe.py --http-port N --grpc-port N [--ca F --cert F --key F] --hz 20 --out FILE
"""
from __future__ import annotations

import argparse
import http.client
import json
import signal
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--ca", type=Path)
    p.add_argument("--cert", type=Path)
    p.add_argument("--key", type=Path)
    p.add_argument("--hz", type=float, default=20.0, help="probes per second of each kind")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    target = f"127.0.0.1:{args.grpc_port}"
    if args.ca:
        creds = grpc.ssl_channel_credentials(args.ca.read_bytes(), args.key.read_bytes(), args.cert.read_bytes())
        channel = grpc.secure_channel(target, creds)
    else:
        channel = grpc.insecure_channel(target)
    health = health_pb2_grpc.HealthStub(channel)
    conn = http.client.HTTPConnection("127.0.0.1", args.http_port, timeout=10)
    period = 1.0 / args.hz / 2
    with args.out.open("w", buffering=1) as out:
        kind = "http"
        while not stop:
            t0 = time.perf_counter()
            wall = time.time()
            try:
                if kind == "http":
                    conn.request("GET", "/healthz")
                    resp = conn.getresponse()
                    resp.read()
                    ok = resp.status == 200
                else:
                    ok = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == 1
            except Exception:  # noqa: BLE001 - a failed probe is a data point
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", args.http_port, timeout=10)
            ms = 1000 * (time.perf_counter() - t0)
            out.write(json.dumps({"t": wall, "kind": kind, "ms": round(ms, 3), "ok": ok}) + "\n")
            kind = "grpc" if kind == "http" else "http"
            time.sleep(max(0.0, period - (time.perf_counter() - t0)))
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
