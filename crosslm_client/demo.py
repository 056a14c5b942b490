"""Write demo silos' private data files from a task's offline dataset.

Each silo gets a label-skewed private share (train + held-out together: the daemon splits
it itself) as `<out>/silo-a.csv`, `silo-b.csv`, ... with columns text,label (label names).
"""
from __future__ import annotations

import csv
import string
from pathlib import Path

from crosslm_shared.data import SplitConfig, load_examples, split_task
from crosslm_shared.tasks import load_task


def prepare_demo(task_name: str, out: Path, *, silos: int = 4, n_private: int = 128, seed: int = 0,
                 partition: str = "dirichlet", alpha: float = 0.5) -> list[Path]:
    task = load_task(task_name)
    examples = load_examples(task)
    cfg = SplitConfig(n_silos=silos, n_private=n_private, n_test=0, n_llm_test=0, n_judge=0,
                      partition=partition, alpha=alpha)
    split = split_task(examples, len(task.labels), cfg, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    names = [label.name for label in task.labels]
    written = []
    for letter, silo in zip(string.ascii_lowercase, split.silos):
        path = out / f"silo-{letter}.csv"
        private = silo.train + silo.val
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows((t, names[y]) for t, y in zip(private.texts, private.labels))
        written.append(path)
    return written
