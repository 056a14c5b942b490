"""Step 5 of a round: enhance the submitting silo's SLM on the kept synthetic set.

Hard labels (the default) are the intended labels; soft labels are the filter's calibrated
judgement (the SLM ensemble, with the LLM's at ``filter.llm_weight``: distillation of what the
other silos know), mixed with the intended label so a sample the ensemble doubts still leans the
way it was asked for. Soft labels earned the SLMs nothing measurable over three seeds on either
task (docs/results.md, "Ablations against the soft-label protocol": RT −2.1 [−5.0, +0.8] points, SMS spam
+1.1 [−1.6, +3.4]), so the simpler hard labels are the default since 2026-12-03.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from crosslm_shared.slm import SLM, SLMTrainConfig, fit
from crosslm_server.method.config import EnhanceConfig


def targets(labels: Sequence[int], probs: np.ndarray, cfg: EnhanceConfig) -> np.ndarray:
    one_hot = np.eye(probs.shape[1])[np.asarray(labels, dtype=np.int64)]
    if cfg.labels == "hard":
        return one_hot
    return cfg.soft_mix * one_hot + (1 - cfg.soft_mix) * probs


def enhance_slm(slm: SLM, texts: Sequence[str], target: np.ndarray, cfg: EnhanceConfig,
                train_cfg: SLMTrainConfig) -> tuple[SLM, dict]:
    """A copy of ``slm`` fine-tuned on the synthetic (texts, target); the original is untouched."""
    out = slm.clone()
    info = fit(out, list(texts), target, lr=cfg.lr, epochs=cfg.epochs, cfg=train_cfg, desc="enhance SLM")
    return out, {"n_synthetic": len(texts), **info}
