"""Silo daemon configuration: one dataclass per TOML section, checked in __post_init__.

Relative paths are resolved against the config file's folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from crosslm_shared.tomlconfig import read_toml
from crosslm_shared.errors import ConfigError
from crosslm_shared.plugins import is_import_path
from crosslm_shared.privacy import AuditConfig, PrivacyConfig
from crosslm_shared.transfer import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

BUILTIN_ARCHS = ("minilm", "mpnet4")  # else "module:attribute", a model family (crosslm_client.models)


def _bad(section: str, name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"[{section}] {name}={value!r} is invalid; allowed: {allowed}")


@dataclass(frozen=True)
class SiloSection:
    name: str = ""                       # this silo's name (dev mode: sent as x-crosslm-silo)
    task: str = "rotten_tomatoes"        # task name shared with the server and the other silos
    labels: tuple[str, ...] = ()         # label names in class-index order
    data: Path = Path("data.csv")        # private data: .csv or .jsonl with text and label
    text_column: str = "text"            # column / key holding the text
    label_column: str = "label"          # column / key holding the label (a name from labels, or its index)
    heldout_fraction: float = 0.25       # share of the data kept aside for evaluation, never trained on
    seed: int = 0                        # seed of the split and of training
    arch: str = "minilm"                 # SLM architecture: minilm, mpnet4, or module:attribute (a model family)
    test_data: Path | None = None        # public test examples (same format), reports only: never trained or selected on

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        if not self.name:
            raise _bad("silo", "name", self.name, "a non-empty name, e.g. \"silo-a\"")
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise _bad("silo", "labels", list(self.labels), "at least two distinct label names")
        if not 0.05 <= self.heldout_fraction <= 0.5:
            raise _bad("silo", "heldout_fraction", self.heldout_fraction, "0.05..0.5")
        if self.arch not in BUILTIN_ARCHS and not is_import_path(self.arch):
            raise _bad("silo", "arch", self.arch, f"{' or '.join(BUILTIN_ARCHS)}, or module:attribute naming a model family")


@dataclass(frozen=True)
class ServerSection:
    address: str = "127.0.0.1:50051"     # host:port of the CrossLM gRPC server
    chunk_size: int = DEFAULT_CHUNK_SIZE  # upload chunk size in bytes (256 KiB .. 4 MiB)
    max_attempts: int = 10               # tries per call on UNAVAILABLE / DEADLINE_EXCEEDED before giving up
    backoff_initial_s: float = 0.5       # first retry delay (doubles, with full jitter)
    backoff_max_s: float = 30.0          # longest retry delay
    idle_timeout_s: float = 120.0        # a transfer with no bytes for this long is cut and resumed (0 = never)
    ca: Path | None = None               # CA certificate (PEM) that signed the server's certificate (ca.pem)
    cert: Path | None = None             # this silo's client certificate (PEM); its CN is the silo's identity
    key: Path | None = None              # the certificate's private key (PEM, keep it 0600)
    server_name: str = ""                # name to check the server certificate against, when the address differs
    plaintext_dev_mode: bool = False     # true: no TLS, silo named by a header (a local demo server only)

    def __post_init__(self) -> None:
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise _bad("server", "chunk_size", self.chunk_size, f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
        if self.max_attempts < 1:
            raise _bad("server", "max_attempts", self.max_attempts, ">= 1")
        if ":" not in self.address:
            raise _bad("server", "address", self.address, "host:port")
        missing = [n for n in ("ca", "cert", "key") if getattr(self, n) is None]
        if missing and not self.plaintext_dev_mode:
            raise _bad("server", "/".join(missing), None,
                       "paths to the files from `crosslm certs` (ca.pem, <silo>.pem, <silo>.key), "
                       "or plaintext_dev_mode = true against a local demo server")


@dataclass(frozen=True)
class TrainSection:
    epochs: int = 4                      # most epochs on the private split (the best epoch on held-out is kept)
    lrs: tuple[float, ...] = (5e-5, 1e-4, 2e-4)  # learning rates tried; the best on held-out wins (tiny: the first)
    batch_size: int = 16                 # batch size
    continue_epochs: int = 1             # epochs on private data after an enhanced SLM comes back (0 = none)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lrs", tuple(float(x) for x in self.lrs))
        if self.epochs < 1 or self.batch_size < 1 or self.continue_epochs < 0:
            raise _bad("train", "epochs/batch_size/continue_epochs",
                       (self.epochs, self.batch_size, self.continue_epochs), "epochs, batch_size >= 1; continue_epochs >= 0")
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise _bad("train", "lrs", list(self.lrs), "one or more positive learning rates")


@dataclass(frozen=True)
class RoundsSection:
    count: int = 1                       # rounds to run; 0 = forever
    interval_s: float = 0.0              # pause between rounds

    def __post_init__(self) -> None:
        if self.count < 0 or self.interval_s < 0:
            raise _bad("rounds", "count/interval_s", (self.count, self.interval_s), ">= 0")


@dataclass(frozen=True)
class SiloConfig:
    silo: SiloSection
    server: ServerSection = field(default_factory=ServerSection)
    train: TrainSection = field(default_factory=TrainSection)
    rounds: RoundsSection = field(default_factory=RoundsSection)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # DP-SGD and the ε budget (docs/privacy.md)
    audit: AuditConfig = field(default_factory=AuditConfig)        # membership-inference audit before upload
    output_dir: Path = Path("silo-out")  # models and per-round JSON reports


_SECTIONS = {"silo": SiloSection, "server": ServerSection, "train": TrainSection, "rounds": RoundsSection,
             "privacy": PrivacyConfig, "audit": AuditConfig}


def load_silo_config(path: Path, *, overrides: dict[str, dict[str, Any]] | None = None) -> SiloConfig:
    raw = read_toml(path, "silo config", overrides=overrides)
    base = Path(path).resolve().parent
    output_dir = raw.pop("output_dir", "silo-out")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; known: {sorted(_SECTIONS)} and output_dir")
    built = {}
    for name, cls in _SECTIONS.items():
        values = dict(raw.get(name, {}))
        extra = sorted(set(values) - {f.name for f in fields(cls)})
        if extra:
            raise ConfigError(f"[{name}] has unknown key(s) {extra}; known: {sorted(f.name for f in fields(cls))}")
        paths = {"silo": ("data", "test_data"), "server": ("ca", "cert", "key")}.get(name, ())
        for key in paths:
            if values.get(key) is not None:
                values[key] = (base / values[key]).resolve()
        try:
            built[name] = cls(**values)
        except TypeError as e:
            raise ConfigError(f"[{name}]: {e}") from e
    return SiloConfig(**built, output_dir=(base / output_dir).resolve())
