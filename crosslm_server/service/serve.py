"""Build a server from its config (`build_server`), then run it (`Server.start`, `serve`).

One process: the gRPC server (CrossLM + grpc.health.v1), the worker thread, and uvicorn
serving the HTTP app in a thread. Health: service "" is SERVING while the process is up;
"crosslm.v1.CrossLM" is SERVING only while ready (engine loaded, store writable, worker
running). Shutdown flips both to NOT_SERVING first, then drains. With `[worker] builtin = false`
the process is a front-end only (no engine, no round): `crosslm-server worker` processes run the
rounds from the shared PostgreSQL store (crosslm_server.service.workerproc).
"""
from __future__ import annotations

import logging
import os
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
from crosslm_server.service.leases import Reaper
from crosslm_server.service.store import MemoryStore, Store
from crosslm_server.service.store.base import LeaseStore
from crosslm_server.service.store.sqlite import SQLiteStore
from crosslm_server.service.worker import Worker

log = logging.getLogger(__name__)
SERVICE_NAME = "crosslm.v1.CrossLM"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def open_store(config: ServerConfig) -> Store:
    if config.store.kind == "memory":
        return MemoryStore()
    if config.store.kind == "postgres":
        from crosslm_server.service.store.postgres import PostgresStore  # psycopg only where it is used

        return PostgresStore(config.store.dsn, pool_size=config.store.pool_size)
    return SQLiteStore(config.store_path)


def frontend_checks(service: CrossLMService, config: ServerConfig) -> None:
    """A front-end loads no engine: it checks uploads with the engines' own content check
    (crosslm_server.engines.admission.check_slm) and the tasks `[engine.options] tasks` names
    (a list of task names, or a table of task -> labels); without it every task is taken and a
    round of a task no worker serves fails there."""
    from crosslm_server.engines.admission import check_slm
    from crosslm_shared.tasks import load_task

    tasks = config.engine.options.get("tasks")
    if isinstance(tasks, dict):
        labels = {name: tuple(names) for name, names in tasks.items()}
    elif isinstance(tasks, list):  # names or task files, keyed by the task's own name as manifests carry it
        labels = {spec.name: tuple(spec.label_names) for spec in map(load_task, tasks)}
    else:
        labels = None
    service.attach_checks(task_labels=None if labels is None else labels.get, content_check=check_slm)


def worker_name(config: ServerConfig) -> str:
    return config.worker.name or f"{socket.gethostname()}:{os.getpid()}"


def start_reaper(store: LeaseStore, service: CrossLMService, config: ServerConfig) -> Reaper | None:
    """Every process on a shared store hands the rounds of lost workers back (each once)."""
    if not config.shared_store:
        return None
    return Reaper(store, every_s=min(5.0, config.worker.lease_s / 4), max_attempts=config.worker.max_attempts,
                  clock=service.clock, on_requeued=service.wake_worker).start()


class Server:
    def __init__(self, config: ServerConfig, *, store: Store, service: CrossLMService, worker: Worker | None,
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
        self._reaper: Reaper | None = None

    def readiness(self) -> tuple[bool, str]:
        if self._stopping.is_set():
            return False, "shutting down"
        try:
            self.store.check_writable()
        except CrossLMError as e:
            return False, str(e)
        if not _dir_writable(Path(self.config.server.data_dir)):
            return False, f"data_dir {str(self.config.server.data_dir)!r} is not writable"
        if self.worker is None:
            return True, "ready (front-end: worker processes run the rounds)"
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
        if not self.config.shared_store:  # shared: other workers' rounds go on, their leases decide
            requeued = self.store.requeue_running(now=self.service.clock())
            for sid in requeued:
                self.service.emit(sid, EventKind.QUEUED, {"position": self.store.queue_position(sid), "rerun": True})
                log.warning("submission %s was interrupted mid-round: queued to run again", sid)
        self._reaper = start_reaper(self.store, self.service, self.config)
        if self.worker is not None:
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
        if self._reaper is not None:
            self._reaper.stop()
        if self.worker is not None and not self.worker.stop(timeout=grace):
            log.warning("round %s still running at shutdown: it will run again on the next start",
                        self.worker.current)
        done.wait(grace)
        self.service.close()
        self._uvicorn.should_exit = True
        if self._http_thread.is_alive():
            self._http_thread.join(5)
        self.http_socket.close()
        if self.worker is None or not self.worker.running:
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
    if config.worker.builtin:
        worker = new_worker(service, engine_factory or default_engine_factory(config), config)
    else:
        worker = None
        frontend_checks(service, config)
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
    return Server(config, store=store, service=service, worker=worker, grpc_server=grpc_server, grpc_port=port,
                  health=health_servicer, http_socket=bind_http(s.http_host, s.http_port), metrics=metrics)


def bind_http(host: str, port: int) -> socket.socket:
    # proto=IPPROTO_TCP so the connections it accepts carry it too: asyncio sets TCP_NODELAY only
    # on sockets that say they are TCP, and without it Nagle held every response's body behind
    # the client's delayed ACK (/healthz took 40 ms instead of 2, measured: docs/performance.md)
    http_socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                                socket.IPPROTO_TCP)
    http_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    http_socket.bind((host, port))
    http_socket.listen(128)
    return http_socket


def default_engine_factory(config: ServerConfig):
    engine_options = dict(config.engine.options)
    if config.engine.name == "crosslm":  # adapter versions live with the rest of the server's state
        engine_options.setdefault("adapters_dir", str(Path(config.server.data_dir) / "adapters"))
    return lambda: create_engine(config.engine.name, engine_options)


def new_worker(service: CrossLMService, engine_factory, config: ServerConfig) -> Worker:
    """The worker of this process: with leases on a shared store, else the one-process queue."""
    if not config.shared_store:
        return Worker(service, engine_factory, nice=config.server.worker_nice)
    return Worker(service, engine_factory, nice=config.server.worker_nice, poll_s=config.worker.poll_s,
                  lease=config.worker, name=worker_name(config))


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    tune_malloc_for_chunks()
    return run_until_signalled(build_server(config))


def run_until_signalled(process) -> int:
    """Start `process` (a Server, a WorkerProcess) and stop it on SIGTERM or SIGINT; exit code 0."""

    def on_signal(signum, frame):
        log.info("received %s", signal.Signals(signum).name)
        threading.Thread(target=process.stop, name="crosslm-shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    process.start()
    while not process.wait(1.0):
        pass
    return 0
