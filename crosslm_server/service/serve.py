"""Build a server from its config (`build_server`), then run it (`Server.start`, `serve`).

One process: the gRPC server (CrossLM + grpc.health.v1), the worker thread, and uvicorn
serving the HTTP app in a thread. Health: service "" is SERVING while the process is up;
"crosslm.v1.CrossLM" is SERVING only while ready (engine loaded, store writable, worker
running). Shutdown flips both to NOT_SERVING first, then drains.
"""
from __future__ import annotations

import logging
import signal
import socket
import tempfile
import threading
from concurrent import futures
from pathlib import Path

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from crosslm_shared.certs import read_pem
from crosslm_shared.errors import ConfigError, CrossLMError
from crosslm_shared.records import EventKind
from crosslm_shared.transfer import tune_malloc_for_chunks
from crosslm_server.engines.api import create_engine
from crosslm_server.service.http import build_app
from crosslm_server.service.metrics import Metrics
from crosslm_server.service.config import Limits, ServerConfig, ServerSection
from crosslm_server.service.logic import CrossLMService
from crosslm_server.service.servicer import CrossLMServicer, add_to_server
from crosslm_server.service.store import MemoryStore, Store
from crosslm_server.service.store.sqlite import SQLiteStore
from crosslm_server.service.worker import Worker

log = logging.getLogger(__name__)
SERVICE_NAME = "crosslm.v1.CrossLM"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def open_store(config: ServerConfig) -> Store:
    if config.store.kind == "memory":
        return MemoryStore()
    return SQLiteStore(config.store_path)


class Server:
    def __init__(self, config: ServerConfig, *, store: Store, service: CrossLMService, worker: Worker,
                 grpc_server: grpc.Server, grpc_port: int, health: health.HealthServicer,
                 http_socket: socket.socket, metrics: Metrics):
        self.config, self.store, self.service, self.worker = config, store, service, worker
        self.grpc_server, self.grpc_port, self.health, self.metrics = grpc_server, grpc_port, health, metrics
        self.http_socket = http_socket
        self.http_port = http_socket.getsockname()[1]
        app = build_app(readiness=self.readiness, metrics=metrics, store=store,
                        operator_token=config.server.operator_credential())
        self._uvicorn = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
        self._http_thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [http_socket]},
                                             name="crosslm-http", daemon=True)
        self._ready_thread = threading.Thread(target=self._track_readiness, name="crosslm-readiness", daemon=True)
        self._janitor_thread = threading.Thread(target=self._janitor, name="crosslm-janitor", daemon=True)
        self._stopped = threading.Event()
        self._stopping = threading.Event()

    def readiness(self) -> tuple[bool, str]:
        if self._stopping.is_set():
            return False, "shutting down"
        try:
            self.store.check_writable()
        except CrossLMError as e:
            return False, str(e)
        if not _dir_writable(Path(self.config.server.data_dir)):
            return False, f"data_dir {str(self.config.server.data_dir)!r} is not writable"
        return self.worker.readiness()

    def _track_readiness(self) -> None:
        while not self._stopping.wait(0.5):
            ok, _ = self.readiness()
            self.health.set(SERVICE_NAME, SERVING if ok else NOT_SERVING)

    def _janitor(self) -> None:
        """Expire abandoned uploads (`[server] upload_ttl_s`), checking a few times per TTL."""
        every = min(60.0, max(0.5, self.config.server.upload_ttl_s / 4))
        while not self._stopping.wait(every):
            try:
                self.service.expire_uploads()
            except Exception:  # noqa: BLE001 - logged; the next pass tries again
                log.exception("expiring abandoned uploads failed; retrying in %.0f s", every)

    def start(self) -> "Server":
        requeued = self.store.requeue_running(now=self.service.clock())
        for sid in requeued:
            self.service.emit(sid, EventKind.QUEUED, {"position": self.store.queue_position(sid), "rerun": True})
            log.warning("submission %s was interrupted mid-round: queued to run again", sid)
        self.worker.start()
        self.grpc_server.start()
        self._http_thread.start()
        self._ready_thread.start()
        self._janitor_thread.start()
        self.health.set("", SERVING)
        log.info("serving gRPC (%s) on %s:%d and HTTP on %s:%d",
                 "PLAINTEXT" if self.config.server.plaintext_dev_mode else "mTLS",
                 self.config.server.grpc_host, self.grpc_port, self.config.server.http_host, self.http_port)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop taking work, let streams and the current round finish within `grace` seconds."""
        if self._stopping.is_set():
            self._stopped.wait()
            return
        grace = self.config.server.grace_s if grace is None else grace
        self._stopping.set()
        self.health.enter_graceful_shutdown()
        log.info("shutting down (grace %.0f s)", grace)
        self.service.stop_watchers()
        done = self.grpc_server.stop(grace)
        if not self.worker.stop(timeout=grace):
            log.warning("round %s still running at shutdown: it will run again on the next start",
                        self.worker.current)
        done.wait(grace)
        self.service.close()
        self._uvicorn.should_exit = True
        if self._http_thread.is_alive():
            self._http_thread.join(5)
        self.http_socket.close()
        if not self.worker.running:
            self.store.close()
        self._stopped.set()
        log.info("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def _dir_writable(folder: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def server_credentials(s: ServerSection) -> grpc.ServerCredentials:
    """mTLS: the server proves itself with its certificate and requires a client certificate
    signed by `tls_ca`; a silo's identity is that certificate's CN."""
    s.require_tls()
    return grpc.ssl_server_credentials([(read_pem(s.tls_key, "[server] tls_key"),
                                         read_pem(s.tls_cert, "[server] tls_cert"))],
                                       root_certificates=read_pem(s.tls_ca, "[server] tls_ca"),
                                       require_client_auth=True)


def build_server(config: ServerConfig, *, engine_factory=None) -> Server:
    """Create and bind everything; nothing runs until `Server.start()`."""
    s = config.server
    if s.plaintext_dev_mode:
        log.warning("PLAINTEXT DEV MODE: no TLS, silos are named by a request header and anyone who can "
                    "reach port %d can upload as any silo. Never expose this server beyond a demo.", s.grpc_port)
        credentials = None
    else:
        credentials = server_credentials(s)
    Path(s.data_dir).mkdir(parents=True, exist_ok=True)
    metrics = Metrics()
    store = open_store(config)
    service = CrossLMService(store, Path(s.data_dir), metrics=metrics,
                             limits=Limits.of(s))
    engine_options = dict(config.engine.options)
    if config.engine.name == "crosslm":  # adapter versions live with the rest of the server's state
        engine_options.setdefault("adapters_dir", str(Path(s.data_dir) / "adapters"))
    factory = engine_factory or (lambda: create_engine(config.engine.name, engine_options))
    worker = Worker(service, factory, nice=s.worker_nice)
    options = [("grpc.max_receive_message_length", s.max_message_bytes),
               ("grpc.max_send_message_length", s.max_message_bytes),
               ("grpc.keepalive_time_ms", s.keepalive_s * 1000),
               ("grpc.keepalive_timeout_ms", 20_000),
               ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
               ("grpc.keepalive_permit_without_calls", 1)]
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=s.grpc_workers, thread_name_prefix="grpc"),
                              options=options)
    add_to_server(CrossLMServicer(service, metrics, allow_dev_identity=s.plaintext_dev_mode,
                                  idle_timeout_s=s.idle_timeout_s, max_uploads_per_silo=s.max_uploads_per_silo,
                                  max_streams_per_silo=s.max_streams_per_silo,
                                  max_streams=s.grpc_workers - s.reserved_workers),
                  grpc_server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", NOT_SERVING)
    health_servicer.set(SERVICE_NAME, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    bind = f"{s.grpc_host}:{s.grpc_port}"
    port = (grpc_server.add_insecure_port(bind) if credentials is None
            else grpc_server.add_secure_port(bind, credentials))
    if not port:
        raise ConfigError(f"[server] grpc_host/grpc_port: cannot bind {bind}; choose a free port (0 = any)")
    # proto=IPPROTO_TCP so the connections it accepts carry it too: asyncio sets TCP_NODELAY only
    # on sockets that say they are TCP, and without it Nagle held every response's body behind
    # the client's delayed ACK (/healthz took 40 ms instead of 2, measured: docs/performance.md)
    http_socket = socket.socket(socket.AF_INET6 if ":" in s.http_host else socket.AF_INET, socket.SOCK_STREAM,
                                socket.IPPROTO_TCP)
    http_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    http_socket.bind((s.http_host, s.http_port))
    http_socket.listen(128)
    return Server(config, store=store, service=service, worker=worker, grpc_server=grpc_server, grpc_port=port,
                  health=health_servicer, http_socket=http_socket, metrics=metrics)


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    tune_malloc_for_chunks()
    server = build_server(config)

    def on_signal(signum, frame):
        log.info("received %s", signal.Signals(signum).name)
        threading.Thread(target=server.stop, name="crosslm-shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    while not server.wait(1.0):
        pass
    return 0
