"""The tiny random BERT of tiny_slm.py inside crosslm_shared.slm's SLM, trained by the shared code.

Where tiny_slm.TinyFamily has its own little training loop, this family trains through exactly
what MiniLM and MPNet silos use (crosslm_shared.slm.train_selected / adopt_if_better, DP-SGD
included), so DP and the audit are tested on the real code path in milliseconds:
`[silo] arch = "fakes.tiny_shared_slm:TINY_SHARED"`.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from crosslm_client.models import SharedFamily
from crosslm_shared.slm import SLM
from transformers import BertTokenizerFast

from fakes.tiny_slm import SPECIAL, WORDS, new_tiny_slm


def tiny_shared_slm(labels: Sequence[str], folder: Path, *, seed: int = 0) -> SLM:
    tiny = new_tiny_slm(list(labels), seed=seed, tokenizer_dir=Path(folder))
    # the vocabulary as a dict: transformers 5 ignores BertTokenizerFast(vocab_file=...), which
    # leaves tiny_slm's tokenizer with 5 tokens (every word [UNK]); a memorisation test needs words
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(SPECIAL + WORDS)}, do_lower_case=True)
    return SLM(tiny.model, tokenizer, list(labels), "tiny")


def random_records(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Random word strings with random labels: nothing to learn but the records themselves
    (what a membership-inference attack finds in a model that memorised them)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(n)], [rng.randrange(2) for _ in range(n)]


class TinySharedFamily(SharedFamily):
    def __init__(self):
        super().__init__("tiny")

    def _base(self, config, work_dir: Path) -> SLM:
        return tiny_shared_slm(config.silo.labels, work_dir / "tokenizer", seed=config.silo.seed)


TINY_SHARED = TinySharedFamily()


class OverfitFamily(TinySharedFamily):
    """Deliberately memorises its training records (many epochs, no held-out selection): the
    model an audit bound must stop (`[silo] arch = "fakes.tiny_shared_slm:OVERFIT"`)."""

    supports_dp = False

    def train_new(self, config, train, held, *, work_dir: Path, privacy=None) -> SLM:
        from crosslm_shared.slm import fit
        from crosslm_shared.slm_config import SLMTrainConfig

        slm = self._base(config, work_dir)
        cfg = SLMTrainConfig(lrs=(3e-3,), batch_size=16, class_weighting="none", warmup_fraction=0.0, head_lr_mult=1.0)
        fit(slm, *train, lr=3e-3, epochs=30, cfg=cfg)
        return slm


OVERFIT = OverfitFamily()
