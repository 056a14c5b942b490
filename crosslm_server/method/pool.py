"""The task's synthetic pool: every kept example so far, from every silo's round.

An enhanced SLM goes back with the pool (``synthetic.jsonl``), so the silo continues on
what the LLM wrote for every silo, not only its own round: synthetic texts are not private,
and they carry what the other silos' SLMs rewarded (the cross-silo transfer). On disk
(the server) the pool is one JSONL file per task, appended once per submission, so a
round that reruns after a crash never adds its examples twice; without a folder
(``crosslm simulate``) it lives in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np


class SyntheticPool:
    def __init__(self, folder: str | Path | None = None, *, max_size: int = 4096):
        self.folder = Path(folder) if folder is not None else None
        self.max_size = max_size
        self._rows: dict[str, list[dict]] = {}

    def _path(self, task: str) -> Path:
        return self.folder / f"{task}.jsonl"

    def _load(self, task: str) -> list[dict]:
        if task not in self._rows:
            rows = []
            if self.folder is not None and self._path(task).exists():
                with self._path(task).open(encoding="utf-8") as fh:
                    for line in fh:
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError:  # a torn last line after a crash: drop it
                            break
            self._rows[task] = rows
        return self._rows[task]

    def add(self, task: str, submission: str, texts: Sequence[str], targets: np.ndarray) -> None:
        """Add one round's kept examples; a submission already in the pool is not added again."""
        rows = self._load(task)
        if any(r["submission"] == submission for r in rows):
            return
        new = [{"submission": submission, "text": t, "target": [float(x) for x in p]}
               for t, p in zip(texts, np.asarray(targets))]
        rows.extend(new)
        if self.folder is not None and new:
            self.folder.mkdir(parents=True, exist_ok=True)
            with self._path(task).open("a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in new)
                fh.flush()
                os.fsync(fh.fileno())

    def get(self, task: str, k: int) -> tuple[list[str], np.ndarray]:
        """The newest ``max_size`` examples: texts and their (K,) targets."""
        rows = self._load(task)[-self.max_size:]
        return [r["text"] for r in rows], np.asarray([r["target"] for r in rows], dtype=np.float64).reshape(-1, k)

    def __len__(self) -> int:
        return sum(len(v) for v in self._rows.values())
