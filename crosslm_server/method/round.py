"""One enhancement round for one submitted SLM: generate → score → filter → update LLM → enhance SLM.

This is the function both ``crosslm simulate`` and the server's worker call; it knows
nothing of gRPC, the store or HTTP. The keep decision is computed right after scoring
because the LLM's task loss trains on the kept samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from crosslm_server.method.config import RoundConfig
from crosslm_server.method.enhance import enhance_slm, targets
from crosslm_server.method.filter import distinct_n, select
from crosslm_server.method.generate import Generation, Sample, generate
from crosslm_server.method.llm import LLM
from crosslm_server.method.llm_update import update_llm
from crosslm_server.method.reward import Scores, judged_proba, reward, score, standardise_per_label
from crosslm_shared.errors import DataError
from crosslm_shared.records import EventKind
from crosslm_shared.slm import SLM
from crosslm_shared.tasks import TaskSpec

Emit = Callable[[EventKind, Mapping[str, Any]], None]


@dataclass
class RoundResult:
    enhanced: SLM
    samples: list[Sample]
    scores: Scores
    keep: list[int]
    metrics: dict
    synthetic: tuple[list[str], np.ndarray]  # the kept texts and the targets the SLM was enhanced on


def _noop(kind: EventKind, fields: Mapping[str, Any]) -> None:
    pass


class _Scored:
    """A scorer's probabilities on this round's texts, computed once (``score`` reads them)."""

    def __init__(self, probs: np.ndarray):
        self.probs = probs

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return self.probs


def usable_scorers(scorers: Sequence[SLM], texts: Sequence[str], emit: Emit = _noop) -> list[_Scored]:
    """The scorers whose outputs on these texts are usable; each one left out is named in a
    ``scorer_dropped`` event (``silo`` from ``slm.info``, ``reason``) and the round goes on with
    the rest. Usable: finite probabilities that sum to 1 and are not the same for every text."""
    kept = []
    for i, slm in enumerate(scorers):
        probs = np.asarray(slm.predict_proba(texts), dtype=np.float64)
        why = _degenerate(probs)
        if why:
            emit(EventKind.SCORER_DROPPED, {"silo": slm.info.get("silo", f"peer-{i}"), "reason": why})
            continue
        kept.append(_Scored(probs))
    if not kept:
        raise DataError(f"all {len(scorers)} scorers gave unusable outputs on this round's texts; "
                        "the round cannot score")
    return kept


def _degenerate(probs: np.ndarray) -> str:
    if probs.size == 0:
        return ""
    if not np.isfinite(probs).all():
        return "non-finite outputs"
    if np.abs(probs.sum(axis=1) - 1.0).max() > 1e-3:
        return "outputs are not probabilities"
    # identical rows, not "nearly": a silo whose calibration hit the temperature cap (20) answers
    # 0.49937 +- 1e-6 yet still ranks the texts, and dropping it failed its own first round
    if len(probs) > 1 and np.ptp(probs, axis=0).max() <= 1e-12:
        return "the same output for every text"
    return ""


def run_round(llm: LLM, task: TaskSpec, submitter: SLM, peers: Sequence[SLM], cfg: RoundConfig, *,
              seed: int, emit: Emit = _noop, generated: Generation | None = None,
              on_generated: Callable[[Generation], None] | None = None, update: bool = True) -> RoundResult:
    """Run DESIGN.md §2 steps 1–5 for ``submitter``; ``peers`` are the latest SLMs of every silo.

    ``generated`` replays the samples of an earlier, interrupted run of this round (the server
    checkpoints them through ``on_generated``), so a rerun does not sample again. ``update=False``
    skips step 3 (the LLM update) entirely: a rerun whose LLM update is already saved must not
    take a second optimizer step; its loss metrics are then NaN and ``llm_steps`` 0.
    """
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    gen = generated or generate(llm, task, cfg.generate, seed=seed,
                                progress=lambda k, n: emit(EventKind.GENERATING, {"done": k, "total": n}))
    if generated is None and on_generated is not None:
        on_generated(gen)
    seconds["generate"] = time.perf_counter() - t
    texts = [s.text for s in gen.samples]
    labels = [s.label for s in gen.samples]

    t = time.perf_counter()
    emit(EventKind.SCORING, {"samples": len(texts)})
    scorers = list(peers) if cfg.reward_from == "all" else [submitter]
    scores = score(usable_scorers(scorers, texts, emit), texts, labels)
    seconds["score"] = time.perf_counter() - t

    t = time.perf_counter()
    judged, llm_weight = judged_proba(scores, llm, task, texts, labels, cfg.filter.llm_weight)
    keep = select(texts, labels, judged, cfg.filter)
    seconds["filter"] = time.perf_counter() - t

    t = time.perf_counter()
    advantage = (scores.advantage if cfg.update.reward == "slms"
                 else standardise_per_label(reward(judged, labels), labels))
    upd = (update_llm(llm, task, [s.prompt for s in gen.samples], texts, labels, advantage, keep,
                      cfg.update, seed=seed,
                      progress=lambda k, n, loss: emit(EventKind.TRAINING_LLM, {"done": k, "total": n, "loss": loss}))
           if update else dict.fromkeys(("loss", "kl", "l_gen", "l_task", "l_prior"), float("nan")) | {"steps": 0})
    seconds["update_llm"] = time.perf_counter() - t

    t = time.perf_counter()
    emit(EventKind.TRAINING_SLM, {"samples": len(keep)})
    kept_texts = [texts[i] for i in keep]
    target = targets([labels[i] for i in keep], judged[keep], cfg.enhance) if keep else np.zeros((0, task.num_labels))
    enhanced, _ = enhance_slm(submitter, kept_texts, target, cfg.enhance, cfg.slm)
    seconds["enhance_slm"] = time.perf_counter() - t

    metrics = {
        "generated": gen.generated,  # every text the LLM wrote, truncated ones dropped before scoring too
        "scored": len(texts),
        "kept": len(keep),
        "kept_per_label": np.bincount([labels[i] for i in keep], minlength=task.num_labels).tolist(),
        "reward_mean": float(scores.reward.mean()),
        "reward_std": float(scores.reward.std()),
        "reward_hist": np.histogram(scores.reward, bins=10, range=(-1, 1))[0].tolist(),
        "agree_rate": float((scores.probs.argmax(1) == np.asarray(labels)).mean()),
        "llm_weight": llm_weight,
        "kl": upd["kl"],
        "l_gen": upd["l_gen"],
        "l_task": upd["l_task"],
        "l_prior": upd["l_prior"],
        "llm_steps": upd["steps"],
        "distinct_2": distinct_n(texts, 2),
        "distinct_2_kept": distinct_n(kept_texts, 2),
        **gen.stats(),  # truncated (hit the cap), truncated_rate, repaired, dropped_truncated, end_*, the limits
        "tokens_per_s": gen.tokens_per_second,
        "seconds_per_stage": seconds,
    }
    return RoundResult(enhanced, gen.samples, scores, keep, metrics, (kept_texts, target))
