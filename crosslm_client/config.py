"""Silo daemon configuration: one dataclass per TOML section, checked in __post_init__.

Relative paths are resolved against the config file's folder.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from crosslm_shared.tomlconfig import read_toml
from crosslm_shared.errors import ConfigError
from crosslm_shared.plugins import is_import_path
from crosslm_shared.privacy import AuditConfig, PrivacyConfig
from crosslm_shared.schema import Renamed, build, option
from crosslm_shared.slm_config import SLMTrainConfig
from crosslm_shared.transfer import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

BUILTIN_ARCHS = ("minilm", "mpnet4")  # else "module:attribute", a model family (crosslm_client.models)


def _bad(section: str, name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"[{section}] {name}={value!r} is invalid; allowed: {allowed}")


@dataclass(frozen=True)
class SiloSection:
    name: str = option("", "this silo's name (dev mode: sent as x-crosslm-silo)")
    task: str = option("rotten_tomatoes", "task name shared with the server and the other silos")
    labels: tuple[str, ...] = option((), "label names in class-index order")
    data: Path = option(Path("data.csv"), "private data: .csv or .jsonl with text and label", path=True)
    text_column: str = option("text", "column / key holding the text")
    label_column: str = option("label", "column / key holding the label (a name from labels, or its index)")
    heldout_fraction: float = option(0.25, "share of the data kept aside for evaluation, never trained on")
    seed: int = option(0, "seed of the split and of training")
    arch: str = option("minilm", "SLM architecture: minilm, mpnet4, or module:attribute (a model family)")
    test_data: Path | None = option(
        None, "public test examples (same format), reports only: never trained or selected on", path=True)

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
    address: str = option("127.0.0.1:50051", "host:port of the CrossLM gRPC server")
    chunk_size: int = option(DEFAULT_CHUNK_SIZE, "upload chunk size in bytes (256 KiB .. 4 MiB)")
    max_attempts: int = option(10, "tries per call on UNAVAILABLE / DEADLINE_EXCEEDED before giving up")
    backoff_initial_s: float = option(0.5, "first retry delay (doubles, with full jitter)")
    backoff_max_s: float = option(30.0, "longest retry delay")
    idle_timeout_s: float = option(120.0, "a transfer with no bytes for this long is cut and resumed (0 = never)")
    ca: Path | None = option(None, "CA certificate (PEM) that signed the server's certificate (ca.pem)", path=True)
    cert: Path | None = option(None, "this silo's client certificate (PEM); its CN is the silo's identity", path=True)
    key: Path | None = option(None, "the certificate's private key (PEM, keep it 0600)", path=True)
    server_name: str = option("", "name to check the server certificate against, when the address differs")
    plaintext_dev_mode: bool = option(False, "true: no TLS, silo named by a header (a local demo server only)")

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
class TrainSection(SLMTrainConfig):
    """How the silo trains its SLM: the same settings as `[round.slm]` of the server's round and of
    `crosslm simulate` (one type, crosslm_shared.slm_config), plus the continuation's epochs. The
    training seed defaults to `[silo] seed`."""

    RENAMED: ClassVar = (Renamed("epochs", "max_epochs"),)
    seed: int | None = option(None, "seed of the initialisation and of the batch order (default: [silo] seed)")
    continue_epochs: int = option(1, "epochs on private data (+ the returned synthetic set) after an enhanced "
                                     "SLM comes back (0 = none: the returned model as it came)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.continue_epochs < 0:
            raise _bad("train", "continue_epochs", self.continue_epochs, ">= 0")

    def slm_config(self, *, seed: int, epochs: int | None = None) -> SLMTrainConfig:
        """The shared training settings, seeded by ``seed`` unless `[train] seed` is set (and with
        the continuation's epochs)."""
        values = {f.name: getattr(self, f.name) for f in fields(SLMTrainConfig)}
        return SLMTrainConfig(**values | {"seed": seed if self.seed is None else self.seed,
                                          "max_epochs": epochs or self.max_epochs})


@dataclass(frozen=True)
class RoundsSection:
    count: int = option(1, "rounds to run; 0 = forever")
    interval_s: float = option(0.0, "pause between rounds")

    def __post_init__(self) -> None:
        if self.count < 0 or self.interval_s < 0:
            raise _bad("rounds", "count/interval_s", (self.count, self.interval_s), ">= 0")


@dataclass(frozen=True)
class SiloConfig:
    silo: SiloSection = option(help="who this silo is and where its private data lives")
    server: ServerSection = option(factory=ServerSection, help="how the silo reaches the server")
    train: TrainSection = option(factory=TrainSection, help="how the silo trains its SLM")
    rounds: RoundsSection = option(factory=RoundsSection, help="how many rounds the daemon runs")
    privacy: PrivacyConfig = option(factory=PrivacyConfig, help="DP-SGD and the epsilon budget (docs/privacy.md)")
    audit: AuditConfig = option(factory=AuditConfig, help="membership-inference audit before upload")
    output_dir: Path = option(Path("silo-out"), "models and per-round JSON reports", path=True)


def load_silo_config(path: Path, *, overrides: dict[str, dict[str, Any]] | None = None) -> SiloConfig:
    raw = read_toml(path, "silo config", overrides=overrides)
    return build(SiloConfig, raw, "", base=Path(path).resolve().parent)
