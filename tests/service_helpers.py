"""Helpers shared by the over-the-wire tests: a tiny SLM bundle and a server on port 0."""
from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from fakes.tiny_slm import new_tiny_slm
from crosslm_shared import convert
from crosslm_shared.bundle import make_manifest
from crosslm_shared.protos.crosslm.v1 import crosslm_pb2 as pb
from crosslm_shared.transfer import crc32c, iter_chunks
from crosslm_server.service.config import EngineSection, ServerConfig, ServerSection, StoreSection
from crosslm_server.service.serve import build_server

LABELS = ("neg", "pos")
OPERATOR_TOKEN = "operator-token-for-tests-0123456789"


def tiny_bundle(root: Path, *, silo: str = "a", seed: int = 0):
    folder = new_tiny_slm(LABELS, seed=seed, tokenizer_dir=root / "tok").save(root / "slm")
    return folder, make_manifest(folder, task="rt", silo=silo, arch="tiny", labels=LABELS,
                                 temperature=1.0, heldout_accuracy=0.5)


def server_config(data_dir: Path, *, store: str = "sqlite", engine_options=None, engine: str = "fakes.tiny_engine:TinyEngine",
                  **server) -> ServerConfig:
    """`engine="fakes.echo_engine:EchoEngine"` for transfer tests whose bundles are not loadable models (echo checks no content)."""
    section = dict(grpc_host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0, data_dir=data_dir,
                   grace_s=5, plaintext_dev_mode=True, operator_token=OPERATOR_TOKEN) | server
    return ServerConfig(
        server=ServerSection(**section),
        store=StoreSection(kind=store),
        engine=EngineSection(name=engine, options=dict(engine_options or {})))


def tls_server_config(data_dir: Path, certs: Path, **kw) -> ServerConfig:
    """A server config with mTLS, from certificates made by `make_certs(certs, ...)`."""
    return server_config(data_dir, plaintext_dev_mode=False, tls_cert=certs / "server.pem",
                         tls_key=certs / "server.key", tls_ca=certs / "ca.pem", **kw)


def start_server(config: ServerConfig, **kw):
    return build_server(config, **kw).start()


def http_get(server, path: str, *, token: str | None = OPERATOR_TOKEN) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def address(server) -> str:
    return f"127.0.0.1:{server.grpc_port}"


def round_trip(c, folder, manifest, upload_id):
    """Upload, submit and watch one round with client `c`; (the submission at the end, its events)."""
    c.upload(folder, manifest, upload_id)
    sub = c.submit(upload_id)
    events = list(c.watch(sub.submission_id))
    return c.get_submission(sub.submission_id), events


# ---- raw wire messages, for tests that speak gRPC without the client ----------------------
def header(upload_id, manifest):
    return pb.UploadRequest(header=pb.UploadHeader(upload_id=upload_id, manifest=convert.manifest_to_pb(manifest)))


def chunk(name, offset, data):
    return pb.UploadRequest(chunk=pb.Chunk(file=name, offset=offset, data=data, crc32c=crc32c(data)))


def messages(upload_id, manifest, folder):
    yield header(upload_id, manifest)
    for entry in manifest.files:
        for c in iter_chunks(folder / entry.name, name=entry.name):
            yield pb.UploadRequest(chunk=convert.chunk_to_pb(c))


def refused(call, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        result = call(*args, **kw)
        if hasattr(result, "__next__"):
            list(result)
    return e.value.code(), e.value.details() or ""
