"""How an SLM is trained: one type for `crosslm simulate`, the server's round (`[round.slm]`) and the
silo daemon. No torch here: reading a config must not load the ML stack."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from crosslm_shared.errors import ConfigError


@dataclass(frozen=True)
class SLMTrainConfig:
    """How an SLM is trained; the same for every arm of a comparison."""

    lrs: tuple[float, ...] = (5e-5, 1e-4, 2e-4)  # grid searched on the validation split
    max_epochs: int = 4  # the best epoch (by validation accuracy) is kept
    batch_size: int = 16
    max_length: int = 64
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    seed: int = 0
    # what selection (lr, epoch, keep-if-better) maximises on the validation split:
    # "balanced_accuracy" (mean per-label recall) does not reward a label-skewed silo's
    # model for answering its majority label
    select_metric: Literal["accuracy", "balanced_accuracy"] = "balanced_accuracy"
    # a label with fewer real validation examples than this is topped up with held-out
    # synthetic examples of that label, when synthetic data came back: a silo that holds 2
    # positives of 128 cannot otherwise tell a model that finds positives from one that never
    # does (its validation split has no positive to miss). 0 = real validation only.
    min_val_per_label: int = 8
    # the loss weighs each label by n / (K · count), capped: a label-skewed silo's model
    # otherwise learns to answer its majority label (part of tuning every arm honestly)
    class_weighting: Literal["none", "balanced"] = "balanced"
    max_class_weight: float = 10.0
    # the classification head (new, random) and the pooler learn at lr × this; the pretrained
    # encoder at lr. 48 examples give 9 steps in 3 epochs: at the encoder's learning rate a
    # random head barely leaves chance (silo-only test accuracy 40-45 % on two RT silos).
    # Measured with 20, silo-only mean over 4 RT silos: seed 0 53.0 → 53.9 %, seed 1 51.7 → 57.6 %
    head_lr_mult: float = 20.0

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
