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
    from crosslm_server.prompts import batched_label_logits

    if not len(texts):
        return np.zeros((0, task.num_labels))
    logits = batched_label_logits(llm, task, texts, batch_size=batch_size)
    return (logits - logits.mean(0, keepdim=True)).softmax(-1).numpy()


def judged_proba(scores: Scores, llm, task, texts: Sequence[str], weight: float) -> np.ndarray:
    """What the filter and the soft labels use: the SLM ensemble, mixed with the LLM's centred
    label distribution at ``weight`` (``filter.llm_weight``)."""
    if weight <= 0:
        return scores.probs
    return (1 - weight) * scores.probs + weight * llm_label_proba(llm, task, texts)
