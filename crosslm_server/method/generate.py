"""Step 1 of a round: label-conditioned synthetic examples from the LLM (with its adapter).

Batched nucleus sampling with the KV cache, prompts padded on the left, each sequence
stopped at the end of its example; never one prompt at a time.

A sequence ends at the task's closing mark, at EOS, and optionally at a newline (the tasks' real
texts are single lines) or, once it is as long as most real texts, at the next sentence end
(``sentence_stop``). One that reaches ``max_new_tokens`` without any of these is *truncated*:
cut off mid-text. How many were is reported, and ``truncated`` decides what happens to them
before they are scored: kept as cut, repaired (cut back to their last complete sentence) or
dropped. ``"auto"`` derives the cap and the sentence stop from the token lengths of the task's
real texts under the LLM's tokenizer (docs/engine.md, "Generations that end").
"""

from __future__ import annotations

import logging
import math
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from crosslm_server.method.llm import LLM
from crosslm_server.method.prompts import generation_prompt
from crosslm_shared.errors import ConfigError, CrossLMError
from crosslm_shared.tasks import TaskSpec
from crosslm_server.method.config import GenerateConfig

log = logging.getLogger(__name__)

# "auto": the cap is this multiple of the 99th percentile of the real texts' token lengths, the
# sentence stop starts at their 90th percentile (measured on RT, SMS and TREC: docs/engine.md)
AUTO_CAP_QUANTILE, AUTO_CAP_FACTOR, AUTO_SENTENCE_QUANTILE, AUTO_MIN_TOKENS = 99, 1.5, 90, 16
ENDS = ("close", "newline", "sentence", "eos", "cap")


@dataclass(frozen=True)
class Sample:
    text: str
    label: int
    prompt: str
    truncated: bool  # hit max_new_tokens before the example ended (then repaired, if ``repaired``)
    end: str = ""  # how it ended: one of ENDS ("" in checkpoints from before 2026-12-07)
    repaired: bool = False  # truncated, then cut back to its last sentence end


@dataclass(frozen=True)
class Generation:
    samples: list[Sample]  # the texts to score: truncated ones dropped when the config says so
    new_tokens: int
    seconds: float
    dropped: int = 0  # truncated texts dropped before scoring (generate.truncated)
    limits: dict = field(default_factory=dict)  # the cap and the sentence stop this generation used

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def generated(self) -> int:
        return len(self.samples) + self.dropped

    @property
    def truncated(self) -> int:
        return sum(s.truncated for s in self.samples) + self.dropped

    def stats(self) -> dict:
        """The round report's figures: truncated count and rate (of every generated text), what
        happened to them, and how the texts ended."""
        ends = {e: sum(s.end == e for s in self.samples) for e in ENDS}
        ends["cap"] += self.dropped
        return {"truncated": self.truncated, "truncated_rate": self.truncated / self.generated if self.generated else 0.0,
                "repaired": sum(s.repaired for s in self.samples), "dropped_truncated": self.dropped,
                **{f"end_{e}": n for e, n in ends.items()}, **self.limits}

    def to_json(self) -> dict:
        return {"samples": [asdict(s) for s in self.samples], "new_tokens": self.new_tokens, "seconds": self.seconds,
                "dropped": self.dropped, "limits": self.limits}

    @classmethod
    def from_json(cls, raw: dict) -> "Generation":
        return cls([Sample(**s) for s in raw["samples"]], raw["new_tokens"], raw["seconds"],
                   raw.get("dropped", 0), raw.get("limits", {}))


def ends_sentence(text: str) -> bool:
    """Whether ``text`` ends right after a sentence end: . ! ? or a symbol character (an emoji;
    not the replacement character of a half-decoded one)."""
    if not text or text[-1].isspace():
        return False
    c = text[-1]
    return c in ".!?" or (unicodedata.category(c) == "So" and c != "\ufffd")


class EndOfExample(StoppingCriteria):
    """Per sequence: stop once the generated text contains the closing mark (or a newline, if
    asked), or, from ``sentence_after`` new tokens on (0: never), ends a sentence.

    Works for any tokenizer (the mark may sit inside a larger token such as ``."``); only the
    last few tokens are decoded each step.
    """

    def __init__(self, tokenizer, prompt_len: int, mark: str, *, newline: bool = False, sentence_after: int = 0,
                 window: int = 4):
        self.tokenizer, self.prompt_len, self.mark, self.window = tokenizer, prompt_len, mark, window
        self.newline, self.sentence_after = newline, sentence_after

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tail = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window):]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        sentence = bool(self.sentence_after) and input_ids.shape[1] - self.prompt_len >= self.sentence_after
        return torch.tensor([self.mark in t or (self.newline and "\n" in t) or (sentence and ends_sentence(t))
                             for t in texts], device=input_ids.device)


ClosingMark = EndOfExample  # the name before 2026-12-07


def _cut(text: str, closing: str) -> tuple[str, bool]:
    head, found, _ = text.partition(closing)
    return head.strip(), not found


def finish(text: str, n_tokens: int, task: TaskSpec, *, cap: int, newline: bool, sentence_after: int) -> tuple[str, str]:
    """The example a sequence of ``n_tokens`` generated tokens (decoded: ``text``) holds, and how
    it ended (one of ENDS); ``"cap"``: it ran out of tokens before it ended."""
    head, found, _ = text.partition(task.closing_mark)
    if found:
        return head.strip(), "close"
    if newline and "\n" in text:
        return text.partition("\n")[0].strip(), "newline"
    if sentence_after and n_tokens >= sentence_after and ends_sentence(text):
        return text.strip(), "sentence"
    if n_tokens >= cap:
        return text.strip(), "cap"
    return text.strip(), "eos"


def repair(text: str) -> str:
    """A truncated text cut back to its last sentence end ("" when it has none)."""
    for i in range(len(text), 0, -1):
        if ends_sentence(text[:i]) and (i == len(text) or text[i].isspace()):
            return text[:i].strip()
    return ""


_LENGTHS: dict[tuple, np.ndarray] = {}


def real_lengths(task: TaskSpec, tokenizer) -> np.ndarray:
    """Token lengths of the task's real texts under the LLM's tokenizer (computed once per task)."""
    from crosslm_shared.data import load_examples

    key = (task.name, repr(task.data), getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    if key not in _LENGTHS:
        try:
            texts = load_examples(task).texts
        except (CrossLMError, OSError) as e:
            raise ConfigError(f"generate: \"auto\" needs the real texts of task {task.name!r} ({e}); "
                              "set round.generate.max_new_tokens and sentence_stop to numbers") from e
        _LENGTHS[key] = np.asarray([len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]])
    return _LENGTHS[key]


def limits(cfg: GenerateConfig, task: TaskSpec, tokenizer) -> tuple[int, int]:
    """(cap, sentence stop) in new tokens, "auto" resolved from the task's real texts."""
    cap, sentence = cfg.max_new_tokens, cfg.sentence_stop
    if "auto" in (cap, sentence):
        lengths = real_lengths(task, tokenizer)
        if cap == "auto":
            cap = max(AUTO_MIN_TOKENS, math.ceil(AUTO_CAP_FACTOR * np.percentile(lengths, AUTO_CAP_QUANTILE)))
        if sentence == "auto":
            sentence = max(1, math.ceil(np.percentile(lengths, AUTO_SENTENCE_QUANTILE)))
    return int(cap), int(sentence)


@torch.no_grad()
def generate(llm: LLM, task: TaskSpec, cfg: GenerateConfig, *, seed: int, per_label: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> Generation:
    """Sample ``per_label`` (default ``cfg.per_label``) texts for every label, templates in turn."""
    n = per_label or cfg.per_label
    jobs = [(lab, generation_prompt(llm.tokenizer, task, lab, i)) for lab in range(task.num_labels) for i in range(n)]
    torch.manual_seed(seed)
    tok = llm.tokenizer
    model = llm.model
    model.eval()
    cap, sentence_after = limits(cfg, task, tok)
    stop_ids = {tok.pad_token_id, tok.eos_token_id} - {None}
    samples: list[Sample] = []
    dropped = new_tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="generate", leave=False, disable=None)
    for i in range(0, len(jobs), cfg.batch_size):
        batch = jobs[i:i + cfg.batch_size]
        enc = tok([p for _, p in batch], return_tensors="pt", padding=True, add_special_tokens=False).to(llm.device)
        stop = EndOfExample(tok, enc["input_ids"].shape[1], task.closing_mark, newline=cfg.stop_at_newline,
                            sentence_after=sentence_after)
        out = model.generate(
            **enc, do_sample=True, top_p=cfg.top_p, temperature=cfg.temperature,
            max_new_tokens=cap, pad_token_id=tok.pad_token_id, use_cache=True,
            stopping_criteria=StoppingCriteriaList([stop]),
        )
        gen = out[:, enc["input_ids"].shape[1]:]
        new_tokens += int((gen != tok.pad_token_id).sum())
        for (lab, prompt), ids in zip(batch, gen.tolist()):
            length = next((k for k, t in enumerate(ids) if t in stop_ids), len(ids))  # then EOS or padding
            text, end = finish(tok.decode(ids[:length], skip_special_tokens=True), length, task, cap=cap,
                               newline=cfg.stop_at_newline, sentence_after=sentence_after)
            truncated, repaired = end == "cap", False
            if truncated and cfg.truncated != "keep":
                fixed = repair(text) if cfg.truncated == "repair" else ""
                if not fixed:
                    dropped += 1
                    continue
                text, repaired = fixed, True
            samples.append(Sample(text=text, label=lab, prompt=prompt, truncated=truncated, end=end, repaired=repaired))
        bar.update(len(batch))
        if progress:
            progress(len(samples) + dropped, len(jobs))
    bar.close()
    gen_ = Generation(samples, new_tokens, time.perf_counter() - start, dropped,
                      {"max_new_tokens": cap, "sentence_stop": sentence_after})
    if gen_.truncated:
        log.info("generate: %d of %d texts hit the cap of %d new tokens (%s)", gen_.truncated, gen_.generated, cap,
                 f"{gen_.stats()['repaired']} repaired, {dropped} dropped" if cfg.truncated != "keep" else "kept as cut")
    return gen_
