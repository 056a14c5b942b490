"""Step 2 of a round: score synthetic texts with the silos' SLMs.

r(x, y) = 2·S(y|x) − 1 ∈ [−1, 1], where S is the mean calibrated probability over the
scoring SLMs (the latest of every silo on the task, or the submitter's alone). The
advantage used by the generation loss is r standardised per label within the round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from crosslm_shared.slm import SLM


@dataclass(frozen=True)
class Scores:
    probs: np.ndarray  # (n, K): ensemble mean of calibrated SLM probabilities
    reward: np.ndarray  # (n,): 2·S(y|x) − 1
    advantage: np.ndarray  # (n,): reward standardised per label


def ensemble_proba(slms: Sequence[SLM], texts: Sequence[str]) -> np.ndarray:
    if not slms:
        raise ValueError("at least one SLM is needed to score")
    return np.mean([slm.predict_proba(texts) for slm in slms], axis=0)


def reward(probs: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """The seed's reward 2·S(y|x) − 1 for each text's intended label."""
    labels = np.asarray(labels, dtype=np.int64)
    return 2.0 * probs[np.arange(len(labels)), labels] - 1.0


def standardise_per_label(values: np.ndarray, labels: Sequence[int], *, eps: float = 1e-6,
                          clip: float = 3.0) -> np.ndarray:
    """(v − mean_y v) / sd_y v within each label, clipped to ±clip.

    Small-data SLMs give rewards with a spread of ~0.03; unscaled, the generation loss would
    be ~30× weaker than the other terms (DESIGN.md §2 step 3). A label with one sample, or
    with no spread, gets advantage 0: it carries no preference.
    """
    labels = np.asarray(labels)
    out = np.zeros_like(values, dtype=np.float64)
    for lab in np.unique(labels):
        m = labels == lab
        v = values[m]
        sd = v.std()
        if m.sum() > 1 and sd > eps:
            out[m] = (v - v.mean()) / sd
    return np.clip(out, -clip, clip)


def score(slms: Sequence[SLM], texts: Sequence[str], labels: Sequence[int]) -> Scores:
    probs = ensemble_proba(slms, texts)
    r = reward(probs, labels)
    return Scores(probs=probs, reward=r, advantage=standardise_per_label(r, labels))


def llm_label_proba(llm, task, texts: Sequence[str], *, batch_size: int = 16) -> np.ndarray:
    """The LLM's label distribution for each text (its verbalizer logits after the
    classification prompt), each label's logit centred over ``texts`` first: the LLM's
    label prior (58 % "negative" on RT, measured) drops out, what it says of each text stays."""
    from crosslm_server.method.prompts import batched_label_logits

    if not len(texts):
        return np.zeros((0, task.num_labels))
    logits = batched_label_logits(llm, task, texts, batch_size=batch_size)
    return (logits - logits.mean(0, keepdim=True)).softmax(-1).numpy()


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the boolean ``positive`` (Mann-Whitney, ties half)."""
    pos, neg = score[positive], score[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def label_agreement(probs: np.ndarray, labels: Sequence[int]) -> float:
    """How well a scorer's label distribution tells apart the labels the texts were generated
    for: the mean over labels of the one-vs-rest AUC of that label's probability (0.5: not at
    all). The server needs no labelled data for it: the intended label is the prompt's."""
    labels = np.asarray(labels)
    per_label = [auc(probs[:, k], labels == k) for k in range(probs.shape[1])]
    per_label = [a for a in per_label if a == a]  # a label absent from the texts has no AUC
    return float(np.mean(per_label)) if per_label else 0.5


def auto_llm_weight(slm_probs: np.ndarray, llm_probs: np.ndarray, labels: Sequence[int]) -> float:
    """The LLM's share of the mix, from each scorer's edge over chance at predicting the intended
    label on this very batch: edge_llm / (edge_llm + edge_slm), edges (AUC − 0.5) floored at 0.
    Measured against the judge (docs/results.md): on RT the SLMs' AUC is 0.63 and the LLM's 0.82
    (share 0.70), on SMS spam 0.79 and 0.56 (share 0.17); the judge's AUCs rank them the same."""
    edge_slm = max(label_agreement(slm_probs, labels) - 0.5, 0.0)
    edge_llm = max(label_agreement(llm_probs, labels) - 0.5, 0.0)
    return edge_llm / (edge_llm + edge_slm) if edge_llm + edge_slm > 0 else 0.0


def judged_proba(scores: Scores, llm, task, texts: Sequence[str], labels: Sequence[int],
                 weight: float | str) -> tuple[np.ndarray, float]:
    """What the filter and the soft labels use, and the LLM's weight in it: the SLM ensemble,
    mixed with the LLM's centred label distribution at ``weight`` (``filter.llm_weight``; "auto":
    weighed per batch by ``auto_llm_weight``)."""
    if weight == 0 or not len(texts):
        return scores.probs, 0.0
    llm_probs = llm_label_proba(llm, task, texts)
    if weight == "auto":
        weight = auto_llm_weight(scores.probs, llm_probs, labels)
    return (1 - weight) * scores.probs + weight * llm_probs, float(weight)
