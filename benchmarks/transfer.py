#!/usr/bin/env python3
"""Upload and download throughput of a large bundle, and the server's peak RSS, next to a raw
grpcio stream of the same bytes, and the same transfers over mTLS, all measured in the same run.

    .venv/bin/python benchmarks/transfer.py --mib 256 [--out bench.json]

The CrossLM server runs as a subprocess (`crosslm-server serve`, engine "echo", which hands the
uploaded SLM back unchanged); the raw baseline is a bare grpcio server in another subprocess
with identity (de)serializers, 1 MiB messages, the same message-size cap. Peak RSS is VmHWM
from /proc/<pid>/status of each server process.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from crosslm_client.tiny import new_tiny_slm
from crosslm_client.transport import CrossLMClient, TlsFiles
from crosslm_shared.certs import make_certs
from crosslm_shared.bundle import make_manifest

MiB = 1024 * 1024
RAW_SERVER = r'''
import sys, os, grpc
from concurrent import futures
sink = open(sys.argv[2], "wb")
def upload(it, ctx):
    n = 0
    for b in it:
        sink.write(b); n += len(b)
    sink.flush(); os.fsync(sink.fileno())
    return n.to_bytes(8, "little")
def download(req, ctx):
    with open(sys.argv[2], "rb") as f:
        while b := f.read(1 << 20):
            yield b
ident = lambda b: b
h = grpc.method_handlers_generic_handler("raw.Raw", {
    "Up": grpc.stream_unary_rpc_method_handler(upload, ident, ident),
    "Down": grpc.unary_stream_rpc_method_handler(download, ident, ident)})
opts = [("grpc.max_receive_message_length", 6 << 20), ("grpc.max_send_message_length", 6 << 20)]
s = grpc.server(futures.ThreadPoolExecutor(4), options=opts, handlers=[h])
s.add_insecure_port("127.0.0.1:" + sys.argv[1]); s.start(); print("ready", flush=True); s.wait_for_termination()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_big_safetensors(path: Path, mib: int) -> None:
    """A valid safetensors file of `mib` MiB written block by block (memory stays flat)."""
    n = mib * MiB // 4
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    block = os.urandom(MiB)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for _ in range(mib):
            f.write(block)


def bench_crosslm(root: Path, folder: Path, manifest, mib: int, *, tls: bool = False) -> dict:
    """Upload then download through a real `crosslm-server` (echo engine), plaintext or mTLS."""
    grpc_port, http_port = free_port(), free_port()
    root = root / ("mtls" if tls else "plain")
    root.mkdir()
    security = 'plaintext_dev_mode = true\n'
    tls_files = None
    if tls:
        paths = make_certs(root / "certs", server_hosts=[], silos=["bench"])
        security = (f'tls_cert = "{paths.server_cert}"\ntls_key = "{paths.server_key}"\ntls_ca = "{paths.ca}"\n')
        tls_files = TlsFiles(ca=paths.ca, cert=paths.silos["bench"][0], key=paths.silos["bench"][1])
    cfg = root / "server.toml"
    cfg.write_text(f'[server]\ngrpc_host = "127.0.0.1"\ngrpc_port = {grpc_port}\nhttp_host = "127.0.0.1"\n'
                   f'http_port = {http_port}\ndata_dir = "data"\nlog_level = "WARNING"\n{security}'
                   '[engine]\nname = "echo"\n')
    proc = subprocess.Popen([sys.executable, "-m", "crosslm_server.server_cli", "serve", "--config", str(cfg)])
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        idle_rss = peak_rss_mib(proc.pid)
        with CrossLMClient(f"127.0.0.1:{grpc_port}", "bench", tls=tls_files) as client:
            t0 = time.perf_counter()
            client.upload(folder, manifest, "bench-upload-0001")
            up_s = time.perf_counter() - t0
            sub = client.submit("bench-upload-0001")
            list(client.watch(sub.submission_id))
            result = client.get_submission(sub.submission_id).result
            t0 = time.perf_counter()
            client.download(sub.submission_id, result, root / "downloaded")
            down_s = time.perf_counter() - t0
        return {"upload_mib_s": round(manifest.total_size / MiB / up_s, 1),
                "download_mib_s": round(result.total_size / MiB / down_s, 1),
                "server_peak_rss_mib": round(peak_rss_mib(proc.pid), 1),
                "server_rss_before_transfers_mib": round(idle_rss, 1)}
    finally:
        proc.terminate()
        proc.wait(60)


def bench_raw(root: Path, source: Path) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", RAW_SERVER, str(port), str(root / "raw.bin")],
                            stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        idle_rss = peak_rss_mib(proc.pid)
        opts = [("grpc.max_receive_message_length", 6 * MiB), ("grpc.max_send_message_length", 6 * MiB)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
            up = ch.stream_unary("/raw.Raw/Up")
            down = ch.unary_stream("/raw.Raw/Down")

            def blocks():
                with source.open("rb") as f:
                    while b := f.read(MiB):
                        yield b
            size = source.stat().st_size
            t0 = time.perf_counter()
            up(blocks())
            up_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            with (root / "raw-down.bin").open("wb") as f:
                for b in down(b""):
                    f.write(b)
            down_s = time.perf_counter() - t0
        return {"upload_mib_s": round(size / MiB / up_s, 1), "download_mib_s": round(size / MiB / down_s, 1),
                "server_peak_rss_mib": round(peak_rss_mib(proc.pid), 1),
                "server_rss_before_transfers_mib": round(idle_rss, 1)}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256, help="size of model.safetensors in MiB (default: 256)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result here (default: stdout only)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="crosslm-bench-") as tmp:
        root = Path(tmp)
        folder = new_tiny_slm(["neg", "pos"], tokenizer_dir=root / "tok").save(root / "slm")
        write_big_safetensors(folder / "model.safetensors", args.mib)
        manifest = make_manifest(folder, task="bench", silo="bench", arch="tiny", labels=["neg", "pos"])
        result = {"bundle_mib": round(manifest.total_size / MiB, 1), "cpu_cores": os.cpu_count(),
                  "crosslm": bench_crosslm(root, folder, manifest, args.mib),
                  "crosslm_mtls": bench_crosslm(root, folder, manifest, args.mib, tls=True),
                  "raw_grpcio": bench_raw(root, folder / "model.safetensors")}
        c, t, r = result["crosslm"], result["crosslm_mtls"], result["raw_grpcio"]
        result["ratios"] = {"upload_vs_raw": round(c["upload_mib_s"] / r["upload_mib_s"], 3),
                            "download_vs_raw": round(c["download_mib_s"] / r["download_mib_s"], 3),
                            "mtls_vs_plain_upload": round(t["upload_mib_s"] / c["upload_mib_s"], 3),
                            "mtls_vs_plain_download": round(t["download_mib_s"] / c["download_mib_s"], 3)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
