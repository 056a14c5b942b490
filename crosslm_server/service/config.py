"""Server configuration: one dataclass per TOML section, checked in __post_init__.

Relative paths in a config file are resolved against the file's folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from crosslm_shared.tomlconfig import read_toml
from crosslm_shared.errors import ConfigError
from crosslm_shared.transfer import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from crosslm_server.engines.api import ENGINES
from crosslm_shared.plugins import is_import_path
from crosslm_shared.schema import build, option

MiB = 1024 * 1024
StoreKind = Literal["sqlite", "memory", "postgres"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


def _bad(section: str, name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"[{section}] {name}={value!r} is invalid; allowed: {allowed}")


@dataclass(frozen=True)
class ServerSection:
    grpc_host: str = option("0.0.0.0", "interface the gRPC server binds")
    grpc_port: int = option(50051, "gRPC port (0 = any free port)")
    http_host: str = option(
        "127.0.0.1", "interface of /healthz /readyz /metrics /v1/submissions (plain HTTP: keep it private)")
    http_port: int = option(8080, "HTTP port (0 = any free port)")
    data_dir: Path = option(Path("crosslm-data"), "uploads, bundles, results, work folders and the SQLite file", path=True)
    plaintext_dev_mode: bool = option(False, "true: no TLS, silo named by the x-crosslm-silo header. Demo only")
    tls_cert: Path | None = option(None, "server certificate (PEM), e.g. runs/certs/server.pem from `crosslm certs`", path=True)
    tls_key: Path | None = option(None, "its private key (PEM, keep it 0600)", path=True)
    tls_ca: Path | None = option(None, "CA that signed the silos' client certificates (ca.pem)", path=True)
    chunk_size: int = option(DEFAULT_CHUNK_SIZE, "download chunk size in bytes (256 KiB - 4 MiB)")
    max_message_bytes: int = option(6 * MiB, "gRPC max send/receive message size; keep a few MiB")
    max_bundle_bytes: int = option(2048 * MiB, "largest bundle accepted")
    max_queue: int = option(
        100, "Submit answers RESOURCE_EXHAUSTED when this many rounds wait (a silo with none waiting still gets in)")
    max_queued_per_silo: int = option(2, "rounds one silo may have waiting at once (fair share of the queue)")
    max_pending_uploads_per_silo: int = option(4, "uploads one silo may hold unsubmitted (partial or complete)")
    max_silo_upload_bytes: int = option(4096 * MiB, "bytes those pending uploads of one silo may reserve on disk")
    upload_ttl_s: float = option(86400.0, "an unsubmitted upload whose files did not change this long is deleted")
    admission_timeout_s: float = option(
        120.0, "the content check of one uploaded SLM (its own process) may take this long")
    admission_memory_bytes: int = option(4096 * MiB, "... and this much memory beyond its process's idle size")
    keep_rounds_per_silo: int = option(4, "files (bundle, result, work folder) of each silo's last N ended rounds")
    grpc_workers: int = option(64, "gRPC handler threads; each open stream (a Watch too) holds one")
    reserved_workers: int = option(8, "handler threads streams may never take: unary calls and health checks")
    max_streams_per_silo: int = option(8, "Upload + Watch + Download streams one silo may hold open at once")
    operator_token: str = option("", "bearer token for HTTP /v1/submissions (\"\" and no file = that view is off)")
    operator_token_file: Path | None = option(
        None, "or a file holding that token (keep it 0600), e.g. from `openssl rand -hex 24`", path=True)
    grace_s: float = option(30.0, "on SIGTERM: time for streams and the current round to finish")
    keepalive_s: int = option(30, "HTTP/2 keepalive pings; a dead peer is dropped")
    idle_timeout_s: float = option(
        120.0, "an upload stream with no header or no bytes for this long is cut (0 = never)")
    max_uploads_per_silo: int = option(4, "Upload streams one silo may hold open at once (RESOURCE_EXHAUSTED beyond)")
    worker_nice: int = option(10, "niceness added to the round's threads (Linux): requests get the CPU first (0..19)")
    log_level: LogLevel = option("INFO", "logging level of the server process")

    def __post_init__(self) -> None:
        for name in ("grpc_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise _bad("server", name, getattr(self, name), "0..65535")
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise _bad("server", "chunk_size", self.chunk_size, f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
        if not MAX_CHUNK_SIZE + 64 * 1024 <= self.max_message_bytes <= 64 * MiB:
            raise _bad("server", "max_message_bytes", self.max_message_bytes,
                       f"{MAX_CHUNK_SIZE + 64 * 1024}..{64 * MiB} (a 4 MiB chunk plus framing, at most 64 MiB)")
        if self.max_bundle_bytes <= 0:
            raise _bad("server", "max_bundle_bytes", self.max_bundle_bytes, "> 0")
        if self.idle_timeout_s < 0:
            raise _bad("server", "idle_timeout_s", self.idle_timeout_s, ">= 0 (0 = never)")
        if self.max_queue < 1:
            raise _bad("server", "max_queue", self.max_queue, ">= 1")
        for name in ("max_uploads_per_silo", "max_queued_per_silo", "max_pending_uploads_per_silo",
                     "max_streams_per_silo", "max_silo_upload_bytes", "keep_rounds_per_silo"):
            if getattr(self, name) < 1:
                raise _bad("server", name, getattr(self, name), ">= 1")
        if self.max_uploads_per_silo > self.max_streams_per_silo:
            raise _bad("server", "max_uploads_per_silo", self.max_uploads_per_silo,
                       f"<= max_streams_per_silo ({self.max_streams_per_silo})")
        if not self.upload_ttl_s > 0:
            raise _bad("server", "upload_ttl_s", self.upload_ttl_s, "> 0 seconds")
        if not self.admission_timeout_s > 0:
            raise _bad("server", "admission_timeout_s", self.admission_timeout_s, "> 0 seconds")
        if self.admission_memory_bytes < 256 * MiB:
            raise _bad("server", "admission_memory_bytes", self.admission_memory_bytes, ">= 256 MiB")
        if self.operator_token and len(self.operator_token) < 16:
            raise _bad("server", "operator_token", "<hidden>", "empty (view off) or at least 16 characters")
        if not 0 <= self.worker_nice <= 19:
            raise _bad("server", "worker_nice", self.worker_nice, "0..19 (0 = the same priority as requests)")
        if self.grpc_workers < 2:
            raise _bad("server", "grpc_workers", self.grpc_workers, ">= 2")
        if not 1 <= self.reserved_workers < self.grpc_workers:
            raise _bad("server", "reserved_workers", self.reserved_workers, f"1..{self.grpc_workers - 1} (< grpc_workers)")
        if self.log_level not in get_args(LogLevel):
            raise _bad("server", "log_level", self.log_level, str(get_args(LogLevel)))

    def operator_credential(self) -> str:
        """The operator's bearer token: `operator_token`, else the content of `operator_token_file`."""
        if self.operator_token or self.operator_token_file is None:
            return self.operator_token
        try:
            token = Path(self.operator_token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"[server] operator_token_file={str(self.operator_token_file)!r} cannot be read "
                              f"({e.strerror}); write the token there or remove the key") from e
        if len(token) < 16:
            raise _bad("server", "operator_token_file", str(self.operator_token_file),
                       "a file holding a token of at least 16 characters")
        return token

    def require_tls(self) -> None:
        """Refuse to serve without mTLS material unless plaintext dev mode was asked for explicitly.

        Checked when serving, not when loading: `crosslm-server adapters` needs no certificates.
        """
        if self.plaintext_dev_mode:
            return
        missing = [name for name in ("tls_cert", "tls_key", "tls_ca") if getattr(self, name) is None]
        if missing:
            raise ConfigError(f"[server] {', '.join(missing)} not set: mTLS needs the server certificate, its key "
                              "and the CA of the silos' certificates (make them with `crosslm certs --out runs/certs "
                              "--silos a,b`), or set plaintext_dev_mode = true for a local demo only")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = Path(getattr(self, name))
            if not path.is_file():
                raise ConfigError(f"[server] {name}={str(path)!r} does not exist; make the certificates with "
                                  "`crosslm certs --out DIR --server-host NAME --silos a,b` and point "
                                  f"{name} at them")


@dataclass(frozen=True)
class StoreSection:
    kind: StoreKind = option("sqlite", "\"sqlite\" (durable, WAL), \"memory\" (tests: forgets on exit) or "
                                       "\"postgres\" (shared by several processes)")
    path: Path | None = option(None, "SQLite file; default <data_dir>/state.db", path=True)
    dsn: str = option("", "PostgreSQL connection string (kind = 'postgres'), e.g. "
                          "'postgresql://crosslm@db:5432/crosslm'; the password in PGPASSWORD or ~/.pgpass, not here")
    pool_size: int = option(8, "PostgreSQL connections one process may hold at once")

    def __post_init__(self) -> None:
        if self.kind not in get_args(StoreKind):
            raise _bad("store", "kind", self.kind, str(get_args(StoreKind)))
        if self.kind == "postgres" and not self.dsn:
            raise _bad("store", "dsn", self.dsn, "a libpq connection string when kind = 'postgres'")
        if self.pool_size < 1:
            raise _bad("store", "pool_size", self.pool_size, ">= 1")


@dataclass(frozen=True)
class WorkerSection:
    """Who runs rounds: the server's own thread (one process, the default) or `crosslm-server
    worker` processes sharing a PostgreSQL store and the data_dir (docs/service.md, "Production
    topology")."""

    builtin: bool = field(default=True, metadata={"help": "true: `serve` runs rounds itself; false: `serve` is a "
                                                          "front-end only and `crosslm-server worker` runs them"})
    name: str = field(default="", metadata={"help": "this worker's name in leases and logs; default host:pid"})
    lease_s: float = field(default=60.0, metadata={"help": "a round's lease; a worker silent this long loses it "
                                                           "and another worker runs the round"})
    heartbeat_s: float = field(default=15.0, metadata={"help": "how often a worker extends its lease "
                                                               "(at most a third of lease_s)"})
    max_attempts: int = field(default=3, metadata={"help": "claims of one round before it is dead-lettered "
                                                           "(failed) instead of queued again"})
    poll_s: float = field(default=1.0, metadata={"help": "how often an idle worker looks for queued rounds"})
    http_port: int = field(default=0, metadata={"help": "`crosslm-server worker`: port of its /healthz /readyz "
                                                        "/metrics on [server] http_host (0 = any free port)"})

    def __post_init__(self) -> None:
        if not self.lease_s > 0:
            raise _bad("worker", "lease_s", self.lease_s, "> 0 seconds")
        if not 0 < self.heartbeat_s <= self.lease_s / 3:
            raise _bad("worker", "heartbeat_s", self.heartbeat_s, f"0 < heartbeat_s <= lease_s / 3 ({self.lease_s / 3:g})")
        if self.max_attempts < 1:
            raise _bad("worker", "max_attempts", self.max_attempts, ">= 1")
        if not self.poll_s > 0:
            raise _bad("worker", "poll_s", self.poll_s, "> 0 seconds")
        if not 0 <= self.http_port <= 65535:
            raise _bad("worker", "http_port", self.http_port, "0..65535")


@dataclass(frozen=True)
class EngineSection:
    name: str = option("crosslm", "\"crosslm\" (the real round) or module:Class (tests/fakes: test engines)")
    options: dict[str, Any] = option(factory=dict, help="keyword arguments for the engine's constructor "
                                                     "(the crosslm engine's: docs/config.md)")

    def __post_init__(self) -> None:
        if self.name not in ENGINES and not is_import_path(self.name):
            raise _bad("engine", "name", self.name, f"{sorted(ENGINES)} or module:Class")


@dataclass(frozen=True)
class ServerConfig:
    server: ServerSection = option(factory=ServerSection, help="the gRPC and HTTP front-end")
    store: StoreSection = option(factory=StoreSection, help="where the service's state lives")
    engine: EngineSection = option(factory=EngineSection, help="what runs a round")
    worker: WorkerSection = option(factory=WorkerSection, help="who runs the rounds: this process, or separate workers")

    def __post_init__(self) -> None:
        if not self.worker.builtin:
            self.require_shared_store("[worker] builtin = false")

    def require_shared_store(self, what: str) -> None:
        """Front-ends and workers apart share their state through PostgreSQL only."""
        if not self.shared_store:
            raise ConfigError(f"{what} needs [store] kind = 'postgres' (got {self.store.kind!r}): separate front-end "
                              "and worker processes share the state through PostgreSQL; with SQLite run `serve` alone")

    @property
    def shared_store(self) -> bool:
        """Several processes share the state (PostgreSQL): rounds are claimed with leases."""
        return self.store.kind == "postgres"

    @property
    def store_path(self) -> Path:
        return self.store.path or self.server.data_dir / "state.db"


def load_server_config(path: Path, *, overrides: dict[str, dict[str, Any]] | None = None) -> ServerConfig:
    """Read a TOML file; `overrides` ({section: {key: value}}) come from command-line flags."""
    raw = read_toml(path, "server config", overrides=overrides)
    base = Path(path).resolve().parent
    options = raw.get("engine", {}).get("options", {})
    # engine paths, like the others, are relative to this file
    for key in ("config", "adapters_dir", "synthetic_dir", "eval_data"):
        if isinstance(options.get(key), str):
            options[key] = str((base / options[key]).resolve())
    return build(ServerConfig, raw, "", base=base)


@dataclass(frozen=True)
class Limits:
    """What one silo may hold of the shared resources (the `[server]` options of the same names)."""

    max_bundle_bytes: int
    chunk_size: int
    max_queue: int = 100
    max_queued_per_silo: int = 2
    max_pending_uploads_per_silo: int = 4
    max_silo_upload_bytes: int = 4 * 1024**3
    upload_ttl_s: float = 24 * 3600.0
    upload_lock_timeout_s: float = 30.0
    admission_timeout_s: float = 120.0
    admission_memory_bytes: int = 4 * 1024**3
    keep_rounds_per_silo: int = 4

    @classmethod
    def of(cls, section: Any) -> "Limits":
        """The limits of a `[server]` section: every field of the same name (the others keep
        their defaults here, e.g. `upload_lock_timeout_s`)."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls) if hasattr(section, f.name)})
