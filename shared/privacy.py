"""What a silo states about privacy: DP-SGD settings (`[privacy]`) and the membership-inference
audit (`[audit]`), read from the silo TOML and the `privacy` / `audit` tables of simulate configs.

No torch here: reading a config must not load the ML stack (the training side is
crosslm_shared.dp, the audit crosslm_shared.audit). docs/privacy.md says how to choose ε.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from crosslm_shared.errors import ConfigError

ACCOUNTANTS = ("rdp", "prv")


def _bad(section: str, name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"[{section}] {name}={value!r} is invalid; allowed: {allowed}")


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD (Opacus) on every training step that touches the silo's private records."""

    enabled: bool = field(default=False, metadata={
        "help": "train the silo's SLM with DP-SGD (per-example clipping and Gaussian noise, Opacus)"})
    epsilon: float = field(default=3.0, metadata={
        "help": "the silo's total ε budget: the first SLM and every planned round together"})
    delta: float | None = field(default=None, metadata={
        "help": "δ of the guarantee; unset = min(1e-5, 1/n), n the silo's training records"})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "per-example gradient clipping norm C (the noise is σ·C; σ comes from the accountant)"})
    rounds: int = field(default=0, metadata={
        "help": "rounds the budget must last (it is spread evenly over the first SLM and these); "
                "0 = the run's round count (required when the daemon runs forever)"})
    train_layers: int = field(default=1, metadata={
        "help": "encoder layers trained under DP, counted from the top (the pooler and head always train); "
                "the rest stay at their pretrained values: fewer noisy parameters, more signal in each. -1 = all"})
    accountant: Literal["rdp", "prv"] = field(default="rdp", metadata={
        "help": "Opacus accountant that composes the steps: rdp (Rényi DP) or prv (privacy random variables)"})

    def __post_init__(self) -> None:
        if not (isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon > 0):
            raise _bad("privacy", "epsilon", self.epsilon, "a finite number > 0 (e.g. 1, 3, 8)")
        if self.delta is not None and not 0 < self.delta < 1:
            raise _bad("privacy", "delta", self.delta, "0 < delta < 1 (well below 1/n), or leave unset")
        if not self.max_grad_norm > 0:
            raise _bad("privacy", "max_grad_norm", self.max_grad_norm, "> 0")
        if self.rounds < 0:
            raise _bad("privacy", "rounds", self.rounds, ">= 0")
        if self.train_layers < -1:
            raise _bad("privacy", "train_layers", self.train_layers, "-1 (all) or >= 0")
        if self.accountant not in ACCOUNTANTS:
            raise _bad("privacy", "accountant", self.accountant, " or ".join(ACCOUNTANTS))

    def delta_for(self, n_records: int) -> float:
        """δ as configured, else min(1e-5, 1/n)."""
        if self.delta is not None:
            return float(self.delta)
        return min(1e-5, 1.0 / max(1, n_records))


@dataclass(frozen=True)
class AuditConfig:
    """A membership-inference audit of exactly the model the silo is about to send."""

    before_upload: bool = field(default=False, metadata={
        "help": "run the audit before every upload and put its figures in the round report"})
    max_auc: float | None = field(default=None, metadata={
        "help": "refuse to send a model whose attack AUC exceeds this (e.g. 0.6); unset = report only"})
    bootstrap: int = field(default=1000, metadata={
        "help": "bootstrap resamples for the sampling error of AUC and TPR at 1 % FPR"})
    max_examples: int = field(default=2000, metadata={
        "help": "most members and most non-members scored (a random draw of each beyond this)"})
    seed: int = field(default=0, metadata={"help": "seed of the draws and the bootstrap"})

    def __post_init__(self) -> None:
        if self.max_auc is not None and not 0.5 <= self.max_auc <= 1.0:
            raise _bad("audit", "max_auc", self.max_auc, "0.5..1.0 (0.5 = no attack does better than chance)")
        if self.bootstrap < 0:
            raise _bad("audit", "bootstrap", self.bootstrap, ">= 0 (0 = no error bars)")
        if self.max_examples < 2:
            raise _bad("audit", "max_examples", self.max_examples, ">= 2")
