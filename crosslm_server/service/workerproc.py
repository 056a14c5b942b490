"""`crosslm-server worker`: a process that claims and runs rounds from a shared PostgreSQL store
and the shared data_dir, beside any number of `serve` front-ends and other workers
(docs/service.md, "Production topology").

It holds no gRPC server: only its worker thread (leases kept by a heartbeat thread), a reaper
that hands the rounds of lost workers back to the queue, and an HTTP server for probes
(/healthz, /readyz: engine loaded and store writable, /metrics). SIGTERM lets the current round
finish within `[server] grace_s`; a round cut short runs again elsewhere once its lease ends.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import uvicorn

from crosslm_shared.errors import CrossLMError
from crosslm_server.service.config import Limits, ServerConfig
from crosslm_server.service.http import build_app
from crosslm_server.service.leases import Reaper
from crosslm_server.service.logic import CrossLMService
from crosslm_server.service.metrics import Metrics
from crosslm_server.service.serve import (bind_http, default_engine_factory, new_worker, open_store,
                                          run_until_signalled, start_reaper)
from crosslm_server.service.worker import Worker

log = logging.getLogger(__name__)


class WorkerProcess:
    def __init__(self, config: ServerConfig, *, engine_factory=None):
        """Open the store and bind the probe port; nothing runs until `start()`."""
        config.require_shared_store("`crosslm-server worker`")
        s = config.server
        Path(s.data_dir).mkdir(parents=True, exist_ok=True)
        self.config, self.metrics = config, Metrics()
        self.store = open_store(config)
        self.service = CrossLMService(self.store, Path(s.data_dir), metrics=self.metrics, limits=Limits.of(s))
        self.worker: Worker = new_worker(self.service, engine_factory or default_engine_factory(config), config)
        self.http_socket = bind_http(s.http_host, config.worker.http_port)
        self.http_port = self.http_socket.getsockname()[1]
        app = build_app(readiness=self.readiness, metrics=self.metrics, store=self.store)
        self._uvicorn = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
        self._http_thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self.http_socket]},
                                             name="crosslm-http", daemon=True)
        self._reaper: Reaper | None = None
        self._stopped = threading.Event()

    def readiness(self) -> tuple[bool, str]:
        try:
            self.store.check_writable()
        except CrossLMError as e:
            return False, str(e)
        return self.worker.readiness()

    def start(self) -> "WorkerProcess":
        self._reaper = start_reaper(self.store, self.service, self.config)
        self.worker.start()
        self._http_thread.start()
        log.info("worker %s: claiming rounds (lease %.1f s, heartbeat %.1f s); HTTP probes on %s:%d",
                 self.worker.name, self.config.worker.lease_s, self.config.worker.heartbeat_s,
                 self.config.server.http_host, self.http_port)
        return self

    def stop(self, grace: float | None = None) -> None:
        grace = self.config.server.grace_s if grace is None else grace
        if self._reaper is not None:
            self._reaper.stop()
        if not self.worker.stop(timeout=grace):
            log.warning("round %s still running at shutdown: it runs again elsewhere once its lease ends",
                        self.worker.current)
        self.service.close()
        self._uvicorn.should_exit = True
        if self._http_thread.is_alive():
            self._http_thread.join(5)
        self.http_socket.close()
        if not self.worker.running:
            self.store.close()
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def run_worker(config: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    return run_until_signalled(WorkerProcess(config))
