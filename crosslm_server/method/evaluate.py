"""The paper's three claims, measured.

- LLM task skill: zero-shot accuracy by label likelihood (raw argmax over the verbalizers,
  no threshold), with the rate of each predicted label;
- LLM generation quality: the on-label rate of its generations by an independent judge
  (an SLM trained on data no silo holds, used for nothing but evaluation);
- LLM generality: perplexity on a general English corpus that nothing trains on.
SLM accuracy is :meth:`crosslm_shared.slm.SLM.evaluate` on each silo's test split.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from crosslm_server.method.generate import Sample
from crosslm_server.method.llm import LLM
from crosslm_server.method.prompts import batched_label_logits, pad_right
from crosslm_server.method.reward import auc
from crosslm_shared import assets
from crosslm_shared.slm import SLM, balanced_accuracy
from crosslm_shared.tasks import TaskSpec


@torch.no_grad()
def zero_shot(llm: LLM, task: TaskSpec, texts: Sequence[str], labels: Sequence[int], *,
              batch_size: int = 16) -> dict:
    """Raw zero-shot accuracy, the rate at which each label is predicted and the balanced accuracy
    (mean recall over the labels present: a constant answer scores 1 / labels, whatever the mix)."""
    pred = batched_label_logits(llm, task, texts, batch_size=batch_size).argmax(-1).numpy()
    rates = np.bincount(pred, minlength=task.num_labels) / max(1, len(pred))
    return {"acc": float((pred == np.asarray(labels)).mean()),
            "pred_rate": {name: float(r) for name, r in zip(task.label_names, rates)},
            "balanced_acc": balanced_accuracy(pred, labels)}


def general_corpus(n_docs: int) -> list[str]:
    lines = [ln.strip() for ln in assets.lee_corpus().read_text(encoding="utf-8", errors="replace").splitlines()]
    return [ln for ln in lines if ln][:n_docs]


@torch.no_grad()
def perplexity(llm: LLM, docs: Sequence[str], *, max_tokens: int = 256, batch_size: int = 8) -> float:
    """Token-level perplexity of the current model (adapter on) over ``docs`` (each cut to max_tokens)."""
    llm.model.eval()
    nll, count = 0.0, 0
    bos = [llm.tokenizer.bos_token_id] if llm.tokenizer.bos_token_id is not None else []
    for i in range(0, len(docs), batch_size):
        rows = [(bos + llm.tokenizer(d, add_special_tokens=False)["input_ids"])[:max_tokens] for d in docs[i:i + batch_size]]
        ids, mask = pad_right(rows, llm.tokenizer.pad_token_id, llm.device)
        logits = llm.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        m = mask[:, 1:].float()
        tok = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        nll -= float((tok * m).sum())
        count += int(m.sum())
    return math.exp(nll / max(1, count))


def on_label_rate(judge: SLM | None, samples: Sequence[Sample]) -> float:
    """Fraction of generations the judge assigns to their intended label (empty texts count as
    misses); NaN without samples or without a judge."""
    if not samples or judge is None:
        return float("nan")
    texts = [s.text for s in samples]
    pred = judge.predict_proba(texts).argmax(1)
    hits = [bool(s.text) and p == s.label for s, p in zip(samples, pred)]
    return float(np.mean(hits))


def label_quality(judge: SLM | None, texts: Sequence[str], labels: Sequence[int], keep: Sequence[int],
                  reward: Sequence[float] | None = None) -> dict:
    """How much the filter and the reward know about labels, by the independent judge.

    ``judge_on_label``: the judge's agreement with the intended labels over every generated
    text; ``judge_on_label_kept``: over the kept ones (above the first: the filter raised label
    quality); ``reward_auc``: the probability that a text the judge agrees with gets a higher
    reward than one it does not (0.5: the reward carries no label information; nan when one
    side is empty, and all three without a judge).
    """
    if not len(texts) or judge is None:
        return {"judge_on_label": float("nan"), "judge_on_label_kept": float("nan"), "reward_auc": float("nan")}
    hits = judge.predict_proba(list(texts)).argmax(1) == np.asarray(labels)
    keep = list(keep)
    out = {"judge_on_label": float(hits.mean()),
           "judge_on_label_kept": float(hits[keep].mean()) if keep else float("nan")}
    out["reward_auc"] = auc(np.asarray(reward, dtype=float), hits) if reward is not None else float("nan")
    return out


