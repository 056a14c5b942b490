"""The engine's configuration: one dataclass per section, loaded from TOML, overridable by flags.

One dataclass per section, all here and none importing torch (reading a config must not load
the ML stack); each step module imports its own (``GenerateConfig`` in generate.py, ...). Fields
are declared and loaded by :mod:`crosslm_shared.schema`: unknown keys and wrong types are errors
that name the section and the key, and docs/config.md is generated from the same declarations.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from crosslm_shared.data import SplitConfig
from crosslm_shared.errors import ConfigError
from crosslm_shared.privacy import PrivacyConfig
from crosslm_shared.schema import build, option
from crosslm_shared.slm_config import SLMTrainConfig
from crosslm_shared.tomlconfig import read_toml

log = logging.getLogger(__name__)


def _positive_or_auto(value, name: str, *, zero_ok: bool) -> None:
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
        raise ConfigError(f"generate.{name} = {value!r}; must be an integer >= {0 if zero_ok else 1} or \"auto\"")


@dataclass(frozen=True)
class GenerateConfig:
    """Sampling settings (DESIGN.md §2 step 1). The defaults are the method as first written
    (cap 64, stop at the closing mark only, truncated texts kept); the example configs end
    generations as the real texts end (docs/engine.md)."""

    per_label: int = option(32, "texts generated per label per round")
    batch_size: int = option(16, "generation batch size")
    max_new_tokens: int | str = option(
        64, "the cap on a text's tokens; \"auto\": 1.5 x the 99th percentile of the task's real texts' lengths")
    top_p: float = option(0.9, "nucleus sampling: the smallest token set holding this much probability")
    temperature: float = option(1.0, "sampling temperature")
    stop_at_newline: bool = option(False, "a newline ends a text (the tasks' texts are single lines)")
    sentence_stop: int | str = option(
        0, "once this many tokens are generated, the next sentence end (. ! ? or a symbol such as an emoji) "
           "ends the text; 0 = off; \"auto\": the real texts' 90th percentile length")
    truncated: Literal["keep", "repair", "drop"] = option(
        "keep", "a text that hit the cap before it ended is kept as cut, repaired (cut back to its last "
                "sentence end; dropped if none) or dropped, before it is scored")

    def __post_init__(self) -> None:
        if self.per_label < 1 or self.batch_size < 1:
            raise ConfigError("generate.per_label, batch_size and max_new_tokens must be >= 1")
        _positive_or_auto(self.max_new_tokens, "max_new_tokens", zero_ok=False)
        _positive_or_auto(self.sentence_stop, "sentence_stop", zero_ok=True)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generate.top_p = {self.top_p}; must be in (0, 1]")
        if self.truncated not in ("keep", "repair", "drop"):
            raise ConfigError(f"generate.truncated = {self.truncated!r}; use keep, repair or drop")


@dataclass(frozen=True)
class FilterConfig:
    enabled: bool = option(True, "off = keep every text within the length bounds (ablation)")
    top_fraction: float = option(0.5, "q: keep the top q of each label's agreeing texts by S(y|x)")
    min_score: float = option(0.0, "tau: absolute floor on S(y|x)")
    # label-skewed silos give an ensemble that answers one label for everything: with argmax the
    # filter kept 0 of 64 (docs/results.md); prior correction removes that bias
    agreement: Literal["argmax", "prior_corrected", "none"] = option(
        "prior_corrected", "how \"the SLMs assign the text to its label\" is decided: argmax of the ensemble, "
                           "or S(y|x) at least the mean of S(y|.) over the round's texts")
    min_words: int = option(3, "shortest text kept, in words")
    max_words: int = option(60, "longest text kept, in words")
    near_dup_ngram: int = option(3, "near duplicates: Jaccard similarity of word n-grams of this size ...")
    near_dup_threshold: float = option(0.7, "... at or above this")
    balance: bool = option(True, "cut every label to the smallest label's count")
    # the rewards of the LLM's update stay the SLMs'; where each scorer knows the labels is
    # measured in docs/results.md ("the LLM-scored filter")
    llm_weight: float | str = option(
        0.0, "w: the kept set and soft labels use (1 - w) x the SLM ensemble + w x the LLM's centred label "
             "judgement; 0 = the SLMs alone; \"auto\": set per batch from each scorer's agreement with the "
             "intended labels")

    def __post_init__(self) -> None:
        if self.agreement not in ("argmax", "prior_corrected", "none"):
            raise ConfigError(f"filter.agreement = {self.agreement!r}; use argmax, prior_corrected or none")
        if self.llm_weight != "auto" and not (isinstance(self.llm_weight, (int, float))
                                              and not isinstance(self.llm_weight, bool) and 0 <= self.llm_weight <= 1):
            raise ConfigError(f"filter.llm_weight = {self.llm_weight!r}; must be in [0, 1] or \"auto\"")
        if not 0 < self.top_fraction <= 1:
            raise ConfigError(f"filter.top_fraction = {self.top_fraction}; must be in (0, 1]")
        if self.min_words < 1 or self.max_words < self.min_words:
            raise ConfigError(f"filter.min_words/max_words = {self.min_words}/{self.max_words}; need 1 <= min <= max")


@dataclass(frozen=True)
class UpdateConfig:
    gamma_gen: float = option(1.0, "gamma1: reward-weighted generation loss (0 = ablation)")
    gamma_task: float = option(0.3, "gamma2: label-word task loss (0 = ablation)")
    gamma_kl: float = option(0.1, "gamma3: KL to the frozen base (0 = ablation)")
    lr: float = option(3e-4, "LoRA learning rate")
    epochs: int = option(1, "passes over the round's kept texts")
    batch_size: int = option(8, "update batch size")
    max_length: int = option(160, "prompt + text tokens per training sequence")
    task_centering: bool = option(True, "the task loss on label logits centred over the step's samples (bias-blind)")
    # the centred task loss is blind to the LLM's label prior, so nothing else holds it
    # (docs/results.md, "the prior anchor")
    gamma_prior: float = option(
        0.0, "gamma4: squared shift of the mean label-word logits against the frozen base, centred across "
             "labels (0 = off)")
    reward: Literal["slms", "judged"] = option(
        "slms", "the generation loss's reward: \"slms\", r = 2 S(y|x) - 1 from the silos' SLMs, or "
                "\"judged\", the same from what the filter judges with")

    def __post_init__(self) -> None:
        if min(self.gamma_gen, self.gamma_task, self.gamma_kl, self.gamma_prior) < 0:
            raise ConfigError("update.gamma_* must be >= 0")
        if self.reward not in ("slms", "judged"):
            raise ConfigError(f"round.update.reward = {self.reward!r}; use 'slms' or 'judged'")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("update.lr must be > 0, update.epochs and update.batch_size >= 1")


@dataclass(frozen=True)
class EnhanceConfig:
    labels: Literal["hard", "soft"] = option("hard", "the enhanced SLM's targets: the intended label, or a soft mix")
    soft_mix: float = option(0.5, "soft target = mix x one_hot(y) + (1 - mix) x the ensemble")
    lr: float = option(5e-5, "learning rate of the SLM's fine-tuning on the kept texts")
    epochs: int = option(2, "epochs of that fine-tuning")

    def __post_init__(self) -> None:
        if self.labels not in ("hard", "soft"):
            raise ConfigError(f"enhance.labels = {self.labels!r}; use 'hard' or 'soft'")
        if not 0 <= self.soft_mix <= 1:
            raise ConfigError(f"enhance.soft_mix = {self.soft_mix}; must be in [0, 1]")


@dataclass(frozen=True)
class EvalConfig:
    n_ppl_docs: int = option(40, "documents of the general corpus for perplexity")
    ppl_max_tokens: int = option(256, "tokens per perplexity document")
    batch_size: int = option(16, "evaluation batch size")
    judge_per_label: int = option(48, "generations per label the judge labels before and after (0 = no judge)")
    judge_arch: str = option("minilm", "the judge's SLM architecture (or a model folder)")
    judge_lr: float = option(1e-4, "the judge's learning rate")
    judge_epochs: int = option(2, "the judge's epochs")


@dataclass(frozen=True)
class LLMConfig:
    """Which LLM the server hosts and how its LoRA adapter is shaped."""

    model: str = option("smollm2-135m", "\"smollm2-135m\" (offline package) or a causal-LM folder")
    lora_r: int = option(8, "LoRA rank")
    lora_alpha: int = option(16, "LoRA alpha")
    lora_dropout: float = option(0.0, "LoRA dropout")
    target_modules: tuple[str, ...] = option(("q_proj", "v_proj", "o_proj"), "modules that get LoRA adapters")
    dtype: Literal["auto", "float32", "bfloat16"] = option("auto", "auto = bf16 on CUDA, fp32 on CPU")

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise ConfigError(f"llm.lora_r = {self.lora_r}; must be >= 1")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"llm.dtype = {self.dtype!r}; use auto, float32 or bfloat16")


@dataclass(frozen=True)
class RoundConfig:
    """Everything one enhancement round needs (the worker's round uses this too)."""

    generate: GenerateConfig = option(factory=GenerateConfig, help="step 1: label-conditioned generation")
    filter: FilterConfig = option(factory=FilterConfig, help="step 3: which texts are kept")
    update: UpdateConfig = option(factory=UpdateConfig, help="step 4: the LLM's LoRA update")
    enhance: EnhanceConfig = option(factory=EnhanceConfig, help="step 5: the SLM's fine-tuning")
    slm: SLMTrainConfig = option(factory=SLMTrainConfig, help="how SLMs are trained")
    reward_from: Literal["all", "submitter"] = option(
        "all", "whose SLMs score: every silo's latest, or the submitter's")

    def __post_init__(self) -> None:
        if self.reward_from not in ("all", "submitter"):
            raise ConfigError(f"round.reward_from = {self.reward_from!r}; use 'all' or 'submitter'")


@dataclass(frozen=True)
class EngineConfig:
    """What the server's round uses (`[engine.options] config`): the task, the LLM, the round and
    its evaluation, and what comes back with an enhanced SLM. `crosslm simulate` runs the same
    round, so a simulate config is an engine config with more: :class:`SimConfig`."""

    task: str = option("rotten_tomatoes", "built-in task name or a task TOML path")
    continue_on: Literal["private", "private+synthetic"] = option(
        "private+synthetic", "what the silo continues the returned SLM on: its private data, or that plus "
                             "the synthetic set that came back (synthetic texts are not private)")
    # ZeroGen gets the same generation budget as the set a silo can draw from
    synthetic_pool: bool = option(
        True, "the synthetic set that comes back is the task's pool (every kept text so far, all silos and "
              "rounds), not only the round's kept texts")
    llm: LLMConfig = option(factory=LLMConfig, help="the LLM and its LoRA adapter")
    round: RoundConfig = option(factory=RoundConfig, help="one enhancement round")
    eval: EvalConfig = option(factory=EvalConfig, help="how the LLM and the synthetic data are measured")

    def __post_init__(self) -> None:
        if self.continue_on not in ("private", "private+synthetic"):
            raise ConfigError(f"continue_on = {self.continue_on!r}; use 'private' or 'private+synthetic'")


@dataclass(frozen=True)
class SimConfig(EngineConfig):
    """A `crosslm simulate` run: N silos and R rounds in one process."""

    seed: int = option(0, "seed of the split, the models and the sampling")
    rounds: int = option(2, "rounds: every silo submits once per round")
    archs: tuple[str, ...] = option(("minilm", "mpnet4"), "SLM architecture per silo, cycled over the silos")
    zerogen: bool = option(True, "also run the ZeroGen baseline (synthetic data from the untouched LLM)")
    save_adapters: bool = option(True, "keep every adapter version in the run folder")
    final_sync: bool = option(
        False, "after the last round every silo takes the whole pool once more, as ZeroGen's silos take its set")
    split: SplitConfig = option(factory=SplitConfig, help="how the task's data is cut into silos and test sets")
    privacy: PrivacyConfig = option(factory=PrivacyConfig, help="DP-SGD for every silo's training on its private "
                                                                 "records, one epsilon budget per silo (docs/privacy.md)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.privacy.enabled and self.zerogen:
            raise ConfigError("privacy.enabled = true needs zerogen = false: the ZeroGen arm's continuation on "
                              "private data is not charged to a DP budget yet (its figures would not be private)")
        if self.rounds < 1:
            raise ConfigError(f"rounds = {self.rounds}; need at least 1")
        if not self.archs:
            raise ConfigError("archs must name at least one SLM architecture")
        if self.final_sync and not self.synthetic_pool:
            raise ConfigError("final_sync = true needs synthetic_pool = true: the sync hands every silo the pool")


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


def _read(path: str | Path | None, overrides: typing.Iterable[str]) -> dict:
    raw: dict = {}
    if path is not None:
        raw = read_toml(path, "config")
    for item in overrides:
        key, value = parse_override(item)
        _set_path(raw, key, value)
    return raw


def load_config(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> SimConfig:
    """A `crosslm simulate` / `study` config."""
    return build(SimConfig, _read(path, overrides), "")


SIMULATE_ONLY = tuple(sorted({f.name for f in dataclasses.fields(SimConfig)}
                             - {f.name for f in dataclasses.fields(EngineConfig)}))


def load_engine_config(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> EngineConfig:
    """The server's round settings. A simulate config may stand in (the demo's server runs the
    simulate config's round): the server says once which of its keys it does not use."""
    raw = _read(path, overrides)
    unused = [k for k in SIMULATE_ONLY if k in raw]
    if unused:
        log.info("engine config %s: using %s; a simulate config's %s do not apply to the server",
                 path, ", ".join(k for k in raw if k not in unused), ", ".join(unused))
        raw = {k: v for k, v in raw.items() if k not in unused}
    return build(EngineConfig, raw, "")


def as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
