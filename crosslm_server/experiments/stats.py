"""Small statistics for comparing arms over seeds and silos."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()) if v.size else float("nan"),
            "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Mean of the paired differences a − b with a percentile bootstrap interval.

    Pairs are resampled with replacement (a pair is one silo under one seed: the same split,
    the same starting SLM, two arms), which keeps the pairing that removes split-to-split noise.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n_pairs": 0}
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"mean": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "n_pairs": int(d.size)}
