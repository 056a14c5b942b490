"""Privacy canary: every byte a silo daemon sends passes a loopback TCP proxy and is searched.

Plaintext dev mode, so the bytes are visible. The private data carries unique canary strings;
none of them, and no private record, may appear in what the client sends: not in the raw
stream, not after reassembling HTTP/2 DATA frames and gRPC messages, not inside any uploaded
file (safetensors header and metadata, tokenizer files), in UTF-8, UTF-16, UTF-32, upper case,
hex or base64.
"""
import base64
import json
import random
import socket
import struct
import threading
from collections import defaultdict

import pytest

from crosslm_client.cli import main
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2 as pb
from service_helpers import server_config, start_server

pytestmark = pytest.mark.privacy
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
POS = ["good film", "great fun movie", "i love it", "the best story", "really nice plot", "very funny"]
NEG = ["bad film", "boring dull movie", "i hate it", "the worst story", "awful weak plot", "very poor"]


class Proxy:
    """Loopback TCP proxy that records every byte from client to server, per connection."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.sent: list[bytearray] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            record = bytearray()
            with self._lock:
                self.sent.append(record)
            threading.Thread(target=self._pump, args=(client, server, record), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, None), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if record is not None:
                    record.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()


def http2_data(stream: bytes) -> dict[int, bytes]:
    """DATA frame payloads of one client connection, joined per HTTP/2 stream."""
    assert stream.startswith(PREFACE), "not an HTTP/2 (gRPC) connection"
    out, pos = defaultdict(bytearray), len(PREFACE)
    while pos + 9 <= len(stream):
        length = int.from_bytes(stream[pos:pos + 3], "big")
        kind, flags = stream[pos + 3], stream[pos + 4]
        sid = int.from_bytes(stream[pos + 5:pos + 9], "big") & 0x7FFFFFFF
        payload = stream[pos + 9:pos + 9 + length]
        pos += 9 + length
        if kind == 0:  # DATA
            if flags & 0x8:  # PADDED
                payload = payload[1:len(payload) - payload[0]]
            out[sid].extend(payload)
    return {sid: bytes(data) for sid, data in out.items()}


def grpc_messages(data: bytes) -> list[bytes]:
    messages, pos = [], 0
    while pos + 5 <= len(data):
        compressed, length = data[pos], struct.unpack(">I", data[pos + 1:pos + 5])[0]
        assert not compressed, "a compressed gRPC message would hide its bytes from this test"
        messages.append(data[pos + 5:pos + 5 + length])
        pos += 5 + length
    return messages


def uploaded_files(streams: dict[int, bytes]) -> dict[str, bytes]:
    """Every file the client uploaded, reassembled from the Upload chunks (keyed upload/file)."""
    files: dict[str, bytearray] = defaultdict(bytearray)
    for data in streams.values():
        msgs = grpc_messages(data)
        try:
            first = pb.UploadRequest.FromString(msgs[0]) if msgs else None
        except Exception:  # noqa: BLE001 - another call's request
            continue
        if first is None or first.WhichOneof("kind") != "header" or not first.header.upload_id:
            continue
        for raw in msgs[1:]:
            chunk = pb.UploadRequest.FromString(raw).chunk
            files[f"{first.header.upload_id}/{chunk.file}"][chunk.offset:chunk.offset + len(chunk.data)] = chunk.data
    return {name: bytes(data) for name, data in files.items()}


def encodings(text: str) -> list[bytes]:
    raw = text.encode()
    forms = [raw, text.upper().encode(), text.encode("utf-16-le"), text.encode("utf-16-be"),
             text.encode("utf-32-le"), raw.hex().encode(), raw.hex().upper().encode()]
    for shift in range(3):  # base64 of the text at any alignment: the stable middle part
        encoded = base64.b64encode(b"\0" * shift + raw)
        forms.append(encoded[4:-4] if len(encoded) > 12 else encoded)
    return forms


def all_streams(sent: list[bytearray]) -> dict[tuple[int, int], bytes]:
    return {(n, sid): data for n, record in enumerate(sent) for sid, data in http2_data(bytes(record)).items()}


def leaks(sent: list[bytearray], secrets: list[str]) -> list[str]:
    """Where any secret shows up, in any encoding, in raw bytes, HTTP/2 streams or uploaded files."""
    streams = all_streams(sent)
    haystacks = {"raw connection bytes": [bytes(r) for r in sent], "HTTP/2 DATA per stream": list(streams.values()),
                 **{f"uploaded file {name}": [data] for name, data in uploaded_files(streams).items()}}
    found = []
    for where, blobs in haystacks.items():
        for blob in blobs:
            folded = blob.lower()
            found += [f"{secret!r} in {where}" for secret in secrets
                      if any(form in blob or form.lower() in folded for form in encodings(secret))]
    return found


def test_the_search_finds_a_planted_leak(tmp_path):
    """Negative control: a canary written into a tokenizer file is found, as UTF-16 too."""
    from crosslm_client.transport import CrossLMClient, TransportError
    from crosslm_shared.bundle import make_manifest
    from service_helpers import LABELS, tiny_bundle

    folder, _ = tiny_bundle(tmp_path / "silo")
    (folder / "special_tokens_map.json").write_bytes(json.dumps({"x": "zqxleak01"}).encode()
                                                      + "zqxleak02".encode("utf-16-le"))
    manifest = make_manifest(folder, task="rt", silo="a", arch="tiny", labels=LABELS)
    server = start_server(server_config(tmp_path / "server"))
    proxy = Proxy(("127.0.0.1", server.grpc_port))
    try:
        with CrossLMClient(f"127.0.0.1:{proxy.port}", "a") as client:
            with pytest.raises(TransportError, match="INVALID_ARGUMENT"):  # the server refuses the broken
                client.upload(folder, manifest, "a-leak-0001")  # tokenizer file, after its bytes went
    finally:
        proxy.close()
        server.stop(grace=1)
    found = leaks(proxy.sent, ["zqxleak01", "zqxleak02", "zqxnotsent"])
    assert any("zqxleak01" in f and "special_tokens_map.json" in f for f in found), found
    assert any("zqxleak02" in f for f in found) and not any("zqxnotsent" in f for f in found)


def test_a_link_planted_in_the_slm_folder_sends_nothing_of_its_target(tmp_path):
    """A tokenizer file swapped for a link to the private data after the manifest was made: the
    client refuses to read it, and no byte of the target crosses the wire."""
    from crosslm_client.transport import CrossLMClient
    from crosslm_shared.errors import BundleError
    from service_helpers import tiny_bundle

    folder, manifest = tiny_bundle(tmp_path / "silo")
    private = tmp_path / "private.csv"
    private.write_text("text,label\nzqxlinkcanary01 is private,pos\n")
    target = folder / "tokenizer.json"
    target.unlink()
    target.symlink_to(private)
    server = start_server(server_config(tmp_path / "server"))
    proxy = Proxy(("127.0.0.1", server.grpc_port))
    try:
        with CrossLMClient(f"127.0.0.1:{proxy.port}", "a") as client:
            with pytest.raises(BundleError, match="regular file"):
                client.upload(folder, manifest, "a-link-0001")
    finally:
        proxy.close()
        server.stop(grace=1)
    assert leaks(proxy.sent, ["zqxlinkcanary01"]) == []


def test_no_canary_and_no_private_record_leaves_the_silo(tmp_path):
    rng = random.Random(7)
    canaries = [f"zqxcanary{i:04d}vk" for i in range(64)]
    rows = [{"text": f"{rng.choice(POS if i % 2 else NEG)} {canary}", "label": "pos" if i % 2 else "neg"}
            for i, canary in enumerate(canaries)]
    (tmp_path / "private.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    server = start_server(server_config(tmp_path / "server"))
    proxy = Proxy(("127.0.0.1", server.grpc_port))
    try:
        cfg = tmp_path / "silo.toml"
        cfg.write_text('output_dir = "out"\n[silo]\nname = "silo-p"\ntask = "rt"\nlabels = ["neg", "pos"]\n'
                       'data = "private.jsonl"\narch = "fakes.tiny_slm:TINY"\nseed = 1\n'
                       f'[server]\naddress = "127.0.0.1:{proxy.port}"\nplaintext_dev_mode = true\nmax_attempts = 3\n'
                       'backoff_initial_s = 0.05\n[train]\nmax_epochs = 2\nlrs = [0.001]\n[rounds]\ncount = 2\n')
        assert main(["run", "--config", str(cfg)]) == 0
    finally:
        proxy.close()
        server.stop(grace=1)

    streams = all_streams(proxy.sent)
    files = uploaded_files(streams)
    assert sum(len(r) for r in proxy.sent) > 100_000, "the proxy saw too little: was it in the path?"
    assert {"model.safetensors", "config.json"} <= {name.split("/", 1)[1] for name in files}
    assert len({name.split("/", 1)[0] for name in files}) == 2  # one upload per round
    # the search sees what is really sent: the silo's name travels (in the manifest), and the
    # reassembled files are whole (config.json parses, the safetensors header is the model's)
    assert any(b"silo-p" in blob for blob in streams.values())
    configs = [json.loads(data) for name, data in files.items() if name.endswith("/config.json")]
    assert configs and all(c["id2label"] == {"0": "neg", "1": "pos"} for c in configs)
    assert leaks(proxy.sent, canaries + [r["text"] for r in rows]) == []
    for name, data in files.items():  # the structured parts of the files, decoded
        if name.endswith(".safetensors"):
            (n,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + n])
            assert not any(c in json.dumps(header) for c in canaries), f"canary in the {name} header"
        if name.endswith((".json", ".txt")):
            text = data.decode("utf-8", errors="replace")
            assert not any(c in text or c[:9] in text for c in canaries), f"canary (or its stem) in {name}"
