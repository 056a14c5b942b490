"""Write demo silos' private data files, and the public test files, from a task's offline dataset.

One seeded cut of the task's pool (``crosslm_shared.data.split_task``, the cut `crosslm simulate`
uses, so the same split config and seed give the same silos) into disjoint parts:

- ``<out>/silo-a.csv``, ``silo-b.csv``, …: each silo's label-skewed private share (train and
  held-out together: the daemon splits it itself);
- ``<public_out>/silo-a-test.csv``, …: each silo's test examples, drawn from the task's overall
  distribution, for reporting only (`[silo] test_data`);
- ``<public_out>/llm-test.csv``: the LLM's zero-shot test set (the server's `eval_data`).

Columns ``text,label`` (label names). A part of size 0 writes no file. ``public_out`` defaults to
``<out>/public``: nothing in it is private, so a server may read it.
"""
from __future__ import annotations

import csv
import string
from pathlib import Path

from crosslm_shared.data import Examples, SplitConfig, load_examples, split_task
from crosslm_shared.tasks import load_task


def prepare_demo(task_name: str | Path, out: Path, *, split: SplitConfig | None = None, seed: int = 0,
                 public_out: Path | None = None) -> list[Path]:
    """Write the files above and return their paths (private files first)."""
    task = load_task(task_name)
    split = split or SplitConfig()
    parts = split_task(load_examples(task), task.num_labels, split, seed=seed)
    out, public_out = Path(out), Path(public_out) if public_out else Path(out) / "public"
    names = task.label_names
    written = [_write(out / f"silo-{letter}.csv", silo.train + silo.val, names)
               for letter, silo in zip(string.ascii_lowercase, parts.silos)]
    if split.n_test:
        written += [_write(public_out / f"silo-{letter}-test.csv", silo.test, names)
                    for letter, silo in zip(string.ascii_lowercase, parts.silos)]
    if split.n_llm_test:
        written.append(_write(public_out / "llm-test.csv", parts.llm_test, names))
    return written


def _write(path: Path, examples: Examples, names: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows((t, names[y]) for t, y in zip(examples.texts, examples.labels))
    return path
