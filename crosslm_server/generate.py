"""Step 1 of a round: label-conditioned synthetic examples from the LLM (with its adapter).

Batched nucleus sampling with the KV cache, prompts padded on the left, each sequence
stopped at the task's closing mark; never one prompt at a time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from crosslm_server.llm import LLM
from crosslm_server.prompts import generation_prompt
from crosslm_shared.errors import ConfigError
from crosslm_shared.tasks import TaskSpec


@dataclass(frozen=True)
class GenerateConfig:
    """Sampling settings (DESIGN.md §2 step 1)."""

    per_label: int = 32  # samples per label per round
    batch_size: int = 16
    max_new_tokens: int = 64
    top_p: float = 0.9
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.per_label < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("generate.per_label, batch_size and max_new_tokens must be >= 1")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generate.top_p = {self.top_p}; must be in (0, 1]")


@dataclass(frozen=True)
class Sample:
    text: str
    label: int
    prompt: str
    truncated: bool  # no closing mark within max_new_tokens


@dataclass(frozen=True)
class Generation:
    samples: list[Sample]
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict:
        return {"samples": [asdict(s) for s in self.samples], "new_tokens": self.new_tokens, "seconds": self.seconds}

    @classmethod
    def from_json(cls, raw: dict) -> "Generation":
        return cls([Sample(**s) for s in raw["samples"]], raw["new_tokens"], raw["seconds"])


class ClosingMark(StoppingCriteria):
    """Per sequence: stop once the generated text contains the closing mark.

    Works for any tokenizer (the mark may sit inside a larger token such as ``."``); only the
    last few tokens are decoded each step.
    """

    def __init__(self, tokenizer, prompt_len: int, mark: str, *, window: int = 4):
        self.tokenizer, self.prompt_len, self.mark, self.window = tokenizer, prompt_len, mark, window

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tail = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window):]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        return torch.tensor([self.mark in t for t in texts], device=input_ids.device)


def _cut(text: str, closing: str) -> tuple[str, bool]:
    head, found, _ = text.partition(closing)
    return head.strip(), not found


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
    samples: list[Sample] = []
    new_tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="generate", leave=False, disable=None)
    for i in range(0, len(jobs), cfg.batch_size):
        batch = jobs[i:i + cfg.batch_size]
        enc = tok([p for _, p in batch], return_tensors="pt", padding=True, add_special_tokens=False).to(llm.device)
        out = model.generate(
            **enc, do_sample=True, top_p=cfg.top_p, temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id, use_cache=True,
            stopping_criteria=StoppingCriteriaList([ClosingMark(tok, enc["input_ids"].shape[1], task.closing_mark)]),
        )
        gen = out[:, enc["input_ids"].shape[1]:]
        new_tokens += int((gen != tok.pad_token_id).sum())
        for (lab, prompt), ids in zip(batch, gen):
            text, truncated = _cut(tok.decode(ids, skip_special_tokens=True), task.closing_mark)
            samples.append(Sample(text=text, label=lab, prompt=prompt, truncated=truncated))
        bar.update(len(batch))
        if progress:
            progress(len(samples), len(jobs))
    bar.close()
    return Generation(samples, new_tokens, time.perf_counter() - start)
