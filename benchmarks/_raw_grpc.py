"""The baselines of benchmarks/transfer.py: bare grpcio, no product logic.

Run as a server process:  python benchmarks/_raw_grpc.py --store FILE --max-message BYTES
(prints "port N" once bound). Methods, all with identity (de)serializers, so the bytes a
client hands grpc are what goes on the wire:

- Up (client stream): each message is appended to FILE; fsync once at the end, like any
  writer that wants the file durable; returns the byte count.
- Down (server stream): FILE in messages of the chunk size given in the request (8 bytes LE).
- UpOne / DownOne (unary): the whole file as one message, the old-Flower way; the caller
  raises `--max-message` above the file size for this server and its client only.

The client functions below are as lean: read a block, hand it to grpc; write what arrives.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent import futures
from pathlib import Path

import grpc


def _ident(b: bytes) -> bytes:
    return b


def _handlers(store: Path):
    def up(messages, context):
        n = 0
        with store.open("wb") as f:
            for block in messages:
                f.write(block)
                n += len(block)
            f.flush()
            os.fsync(f.fileno())
        return n.to_bytes(8, "little")

    def down(request, context):
        chunk = int.from_bytes(request, "little")
        with store.open("rb") as f:
            while block := f.read(chunk):
                yield block

    def up_one(request, context):
        with store.open("wb") as f:
            f.write(request)
            f.flush()
            os.fsync(f.fileno())
        return len(request).to_bytes(8, "little")

    def down_one(request, context):
        return store.read_bytes()

    return grpc.method_handlers_generic_handler("raw.Raw", {
        "Up": grpc.stream_unary_rpc_method_handler(up, _ident, _ident),
        "Down": grpc.unary_stream_rpc_method_handler(down, _ident, _ident),
        "UpOne": grpc.unary_unary_rpc_method_handler(up_one, _ident, _ident),
        "DownOne": grpc.unary_unary_rpc_method_handler(down_one, _ident, _ident)})


def options(max_message: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message), ("grpc.max_send_message_length", max_message)]


def serve(store: Path, max_message: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(4), options=options(max_message), handlers=[_handlers(store)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)
    server.wait_for_termination()


# ---- client side ------------------------------------------------------------------------------
def upload_stream(channel: grpc.Channel, source: Path, chunk: int) -> int:
    def blocks():
        with source.open("rb") as f:
            while block := f.read(chunk):
                yield block
    return int.from_bytes(channel.stream_unary("/raw.Raw/Up")(blocks()), "little")


def download_stream(channel: grpc.Channel, dest: Path, chunk: int) -> int:
    n = 0
    with dest.open("wb") as f:
        for block in channel.unary_stream("/raw.Raw/Down")(chunk.to_bytes(8, "little")):
            f.write(block)
            n += len(block)
    return n


def upload_single(channel: grpc.Channel, source: Path) -> int:
    return int.from_bytes(channel.unary_unary("/raw.Raw/UpOne")(source.read_bytes()), "little")


def download_single(channel: grpc.Channel, dest: Path) -> int:
    data = channel.unary_unary("/raw.Raw/DownOne")(b"")
    dest.write_bytes(data)
    return len(data)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, required=True, help="the file Up writes and Down reads")
    p.add_argument("--max-message", type=int, default=6 * 1024 * 1024, help="grpc message cap, bytes")
    args = p.parse_args()
    serve(args.store, args.max_message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
