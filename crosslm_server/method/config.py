"""The engine's configuration: one dataclass per section, loaded from TOML, overridable by flags.

Each section's dataclass lives beside the step it configures (``GenerateConfig`` in
generate.py, ...); this module only assembles them. Unknown keys are errors that name the
section, the key and the keys allowed.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from crosslm_server.method.enhance import EnhanceConfig
from crosslm_server.method.evaluate import EvalConfig
from crosslm_server.method.filter import FilterConfig
from crosslm_server.method.generate import GenerateConfig
from crosslm_server.method.llm import LLMConfig
from crosslm_server.method.llm_update import UpdateConfig
from crosslm_shared.data import SplitConfig
from crosslm_shared.errors import ConfigError
from crosslm_shared.tomlconfig import read_toml
from crosslm_shared.slm import SLMTrainConfig


@dataclass(frozen=True)
class RoundConfig:
    """Everything one enhancement round needs (the worker's round uses this too)."""

    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    enhance: EnhanceConfig = field(default_factory=EnhanceConfig)
    slm: SLMTrainConfig = field(default_factory=SLMTrainConfig)
    reward_from: Literal["all", "submitter"] = "all"  # whose SLMs score: every silo's latest, or the submitter's

    def __post_init__(self) -> None:
        if self.reward_from not in ("all", "submitter"):
            raise ConfigError(f"round.reward_from = {self.reward_from!r}; use 'all' or 'submitter'")


@dataclass(frozen=True)
class SimConfig:
    """A `crosslm simulate` run: N silos and R rounds in one process."""

    task: str = "rotten_tomatoes"  # built-in task name or a task TOML path
    seed: int = 0
    rounds: int = 2
    archs: tuple[str, ...] = ("minilm", "mpnet4")  # SLM architecture per silo, cycled over the silos
    zerogen: bool = True  # also run the ZeroGen-style baseline (synthetic data from the untouched LLM)
    save_adapters: bool = True
    # the silo continues the returned SLM on its private data alone, or on private data plus the
    # kept synthetic set that came back with it (synthetic texts are not private)
    continue_on: Literal["private", "private+synthetic"] = "private+synthetic"
    # which synthetic set comes back with an enhanced SLM: the kept examples of that round, or
    # the task's pool (every kept example so far, all silos and rounds: synthetic texts are
    # not private, and they carry what the other silos' SLMs rewarded). ZeroGen gets the
    # same generation budget as the set a silo can draw from.
    synthetic_pool: bool = True
    # after the last round every silo takes the whole pool once more, as ZeroGen's silos take its
    # whole set: a silo that submits early in a round has otherwise seen only part of it
    final_sync: bool = False
    split: SplitConfig = field(default_factory=SplitConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    round: RoundConfig = field(default_factory=RoundConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds = {self.rounds}; need at least 1")
        if not self.archs:
            raise ConfigError("archs must name at least one SLM architecture")
        if self.continue_on not in ("private", "private+synthetic"):
            raise ConfigError(f"continue_on = {self.continue_on!r}; use 'private' or 'private+synthetic'")
        if self.final_sync and not self.synthetic_pool:
            raise ConfigError("final_sync = true needs synthetic_pool = true: the sync hands every silo the pool")


def _build(cls, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"[{where}] must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ConfigError(f"[{where}] has unknown key(s) {sorted(unknown)}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}.{name}" if where else name)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"[{where or 'top level'}]: {e}") from e


def _set_path(raw: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def parse_override(text: str) -> tuple[str, object]:
    """``section.key=value`` with value parsed as TOML (strings may go unquoted)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def load_config(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> SimConfig:
    raw: dict = {}
    if path is not None:
        raw = read_toml(path, "config")
    for item in overrides:
        key, value = parse_override(item)
        _set_path(raw, key, value)
    return _build(SimConfig, raw, "")


def as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
