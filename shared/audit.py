"""Membership-inference audit of the exact model a silo is about to send.

The attack is the standard loss-threshold attack (Yeom et al. 2018): a record is called a
member when the model's log-probability of its true label is high. Members are the silo's
training records, non-members records from the same split that it never trained on (its
held-out split). Reported: ROC AUC (0.5 = the attack cannot tell members from non-members)
and the TPR at 1 % FPR (Carlini et al. 2022), each with a bootstrap standard error and 95 %
interval over members and non-members resampled. With fewer than 100 non-members "1 % FPR"
means no false positive at all; ``fpr_resolution`` states the smallest FPR step.

Any model with ``predict_proba(texts) -> (n, K)`` works (the SLMs and the tests' tiny ones).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from crosslm_shared.errors import DataError
from crosslm_shared.privacy import AuditConfig

FPR = 0.01


def _sklearn():
    try:
        from sklearn import metrics
    except ImportError as e:
        from crosslm_shared.errors import AssetMissingError

        raise AssetMissingError(f"the audit needs scikit-learn: {e}; install CrossLM with the 'privacy' extra") from e
    return metrics


def member_scores(model: Any, texts: Sequence[str], labels: Sequence[int]) -> np.ndarray:
    """log p(true label | text): the attack's score, higher = more likely a member."""
    proba = np.asarray(model.predict_proba(list(texts)), dtype=np.float64)
    return np.log(np.clip(proba[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)], 1e-30, 1.0))


def auc_and_tpr(scores_in: np.ndarray, scores_out: np.ndarray, *, fpr: float = FPR) -> tuple[float, float]:
    """ROC AUC and the highest TPR at FPR ≤ ``fpr`` of the threshold attack on these scores."""
    metrics = _sklearn()
    y = np.r_[np.ones(len(scores_in)), np.zeros(len(scores_out))]
    s = np.r_[scores_in, scores_out]
    f, t, _ = metrics.roc_curve(y, s)
    return float(metrics.roc_auc_score(y, s)), float(t[f <= fpr].max())


def _draw(rng: np.random.Generator, n: int, cap: int) -> np.ndarray:
    return np.arange(n) if n <= cap else np.sort(rng.choice(n, size=cap, replace=False))


def loss_attack(model: Any, members: tuple[Sequence[str], Sequence[int]],
                nonmembers: tuple[Sequence[str], Sequence[int]], cfg: AuditConfig | None = None) -> dict:
    """The loss-threshold attack on ``model``; members and non-members as (texts, label ids)."""
    cfg = cfg or AuditConfig()
    if len(members[0]) < 2 or len(nonmembers[0]) < 2:
        raise DataError(f"the audit needs at least 2 members and 2 non-members; got {len(members[0])} and "
                        f"{len(nonmembers[0])} (a larger [silo] heldout_fraction gives more non-members)")
    rng = np.random.default_rng(cfg.seed)
    picks = [_draw(rng, len(d[0]), cfg.max_examples) for d in (members, nonmembers)]
    s_in, s_out = (member_scores(model, [d[0][i] for i in p], [d[1][i] for i in p])
                   for d, p in zip((members, nonmembers), picks))
    auc, tpr = auc_and_tpr(s_in, s_out)
    out = {"attack": "loss-threshold", "auc": auc, "tpr_at_1pct_fpr": tpr, "n_members": len(s_in),
           "n_nonmembers": len(s_out), "fpr_resolution": 1.0 / len(s_out),
           "mean_score_members": float(s_in.mean()), "mean_score_nonmembers": float(s_out.mean())}
    if cfg.bootstrap:
        boot = np.array([auc_and_tpr(rng.choice(s_in, len(s_in)), rng.choice(s_out, len(s_out)))
                         for _ in range(cfg.bootstrap)])
        for j, name in enumerate(("auc", "tpr_at_1pct_fpr")):
            out[f"{name}_se"] = float(boot[:, j].std(ddof=1))
            out[f"{name}_ci95"] = [float(np.quantile(boot[:, j], 0.025)), float(np.quantile(boot[:, j], 0.975))]
    return out
