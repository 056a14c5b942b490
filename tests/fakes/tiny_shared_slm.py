"""The tiny random BERT of tiny_slm.py inside crosslm_shared.slm's SLM, trained by the shared code.

Where tiny_slm.TinyFamily has its own little training loop, this family trains through exactly
what MiniLM and MPNet silos use (crosslm_shared.slm.train_selected / adopt_if_better, DP-SGD
included), so DP and the audit are tested on the real code path in milliseconds:
`[silo] arch = "fakes.tiny_shared_slm:TINY_SHARED"`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from crosslm_client.models import SharedFamily
from crosslm_shared.slm import SLM
from fakes.tiny_slm import new_tiny_slm


def tiny_shared_slm(labels: Sequence[str], folder: Path, *, seed: int = 0) -> SLM:
    tiny = new_tiny_slm(list(labels), seed=seed, tokenizer_dir=Path(folder))
    return SLM(tiny.model, tiny.tokenizer, list(labels), "tiny")


class TinySharedFamily(SharedFamily):
    def __init__(self):
        super().__init__("tiny")

    def _base(self, config, work_dir: Path) -> SLM:
        return tiny_shared_slm(config.silo.labels, work_dir / "tokenizer", seed=config.silo.seed)


TINY_SHARED = TinySharedFamily()
