"""Step 4 of a round: keep the synthetic examples the SLMs agree with.

Per label: texts the SLM ensemble assigns to that label (its argmax, or by default S(y|x) above
the round's mean S(y|·), which corrects the bias of label-skewed SLMs) that rank in the top
fraction q by S(y|x) (a relative rule: small-data SLMs are underconfident, so a fixed threshold keeps
nothing), with τ as an optional absolute floor. Then: length bounds, exact and near
duplicates dropped, classes balanced.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from crosslm_server.method.config import FilterConfig


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _norm(text).split()
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def dedup(texts: Sequence[str], order: Sequence[int], *, n: int, threshold: float) -> list[int]:
    """Indices from ``order`` (best first) whose text is neither an exact nor a near duplicate of an earlier one."""
    kept: list[int] = []
    seen_exact: set[str] = set()
    grams: list[set] = []
    for i in order:
        key = _norm(texts[i])
        if key in seen_exact:
            continue
        g = _ngrams(texts[i], n)
        if any(len(g & h) / max(1, len(g | h)) >= threshold for h in grams):
            continue
        seen_exact.add(key)
        grams.append(g)
        kept.append(i)
    return kept


def select(texts: Sequence[str], labels: Sequence[int], probs: np.ndarray, cfg: FilterConfig) -> list[int]:
    """Indices of the kept examples, grouped by label, best first within a label."""
    labels = np.asarray(labels)
    lengths = np.array([len(t.split()) for t in texts])
    in_bounds = (lengths >= cfg.min_words) & (lengths <= cfg.max_words)
    per_label: list[list[int]] = []
    prior = probs.mean(axis=0)
    for lab in range(probs.shape[1]):
        idx = np.flatnonzero((labels == lab) & in_bounds)
        s = probs[idx, lab]
        if cfg.enabled:
            ok = s >= cfg.min_score
            if cfg.agreement == "argmax":
                ok &= probs[idx].argmax(1) == lab
            elif cfg.agreement == "prior_corrected":
                ok &= s >= prior[lab]
            idx, s = idx[ok], s[ok]
        order = idx[np.argsort(-s, kind="stable")].tolist()
        order = dedup(texts, order, n=cfg.near_dup_ngram, threshold=cfg.near_dup_threshold)
        if cfg.enabled:
            # q applies to this label's generated texts, so a label the SLMs rarely agree with keeps few
            order = order[: max(1, int(round(cfg.top_fraction * int((labels == lab).sum()))))] if order else []
        per_label.append(order)
    if cfg.balance:
        present = [len(o) for o in per_label]
        cap = min(present) if present else 0
        per_label = [o[:cap] for o in per_label]
    return [i for o in per_label for i in o]


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n: unique word n-grams over all word n-grams (diversity, Li et al. 2016)."""
    total, unique = 0, set()
    for t in texts:
        w = t.lower().split()
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0
