"""How an SLM is trained: one type for `crosslm simulate`, the server's round (`[round.slm]`) and the
silo daemon. No torch here: reading a config must not load the ML stack."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from crosslm_shared.errors import ConfigError
from crosslm_shared.schema import option


@dataclass(frozen=True)
class SLMTrainConfig:
    """How an SLM is trained; the same for every arm of a comparison."""

    lrs: tuple[float, ...] = option((5e-5, 1e-4, 2e-4), "learning rates tried; the best on the validation split wins")
    max_epochs: int = option(4, "most epochs; the best epoch by validation score is kept")
    batch_size: int = option(16, "training batch size")
    max_length: int = option(64, "tokens per text (longer texts are cut)")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_fraction: float = option(0.1, "share of the steps with a linear learning-rate warm-up")
    seed: int = option(0, "seed of the initialisation and of the batch order")
    # balanced accuracy (mean per-label recall) does not reward a label-skewed silo's model for
    # answering its majority label
    select_metric: Literal["accuracy", "balanced_accuracy"] = option(
        "balanced_accuracy", "what selection (learning rate, epoch, keep-if-better) maximises on the validation split")
    # a silo that holds 2 positives of 128 cannot otherwise tell a model that finds positives
    # from one that never does (its validation split has no positive to miss)
    min_val_per_label: int = option(
        8, "a label with fewer real validation examples is topped up with held-out synthetic ones, when "
           "synthetic data came back (0 = real validation only)")
    # a label-skewed silo's model otherwise learns to answer its majority label
    class_weighting: Literal["none", "balanced"] = option(
        "balanced", "\"balanced\": the loss weighs each label by n / (K * count), capped at max_class_weight")
    max_class_weight: float = option(10.0, "cap of a label's loss weight under balanced class weighting")
    # 48 examples give 9 steps in 3 epochs: at the encoder's learning rate a random head barely
    # leaves chance (docs/results.md, `slm.head_lr_mult`)
    head_lr_mult: float = option(20.0, "the new classification head and the pooler learn at lr x this")

    def __post_init__(self) -> None:
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise ConfigError(f"slm.lrs = {self.lrs}; give one or more positive learning rates")
        if self.max_epochs < 1 or self.batch_size < 1:
            raise ConfigError("slm.max_epochs and slm.batch_size must be >= 1")
        if self.class_weighting not in ("none", "balanced"):
            raise ConfigError(f"slm.class_weighting = {self.class_weighting!r}; use 'none' or 'balanced'")
        if self.min_val_per_label < 0:
            raise ConfigError(f"slm.min_val_per_label = {self.min_val_per_label}; must be >= 0")
        if self.head_lr_mult <= 0:
            raise ConfigError(f"slm.head_lr_mult = {self.head_lr_mult}; must be > 0")
        if self.select_metric not in ("accuracy", "balanced_accuracy"):
            raise ConfigError(f"slm.select_metric = {self.select_metric!r}; use 'accuracy' or 'balanced_accuracy'")
