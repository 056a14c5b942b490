"""Private data loading for the silo daemon: CSV or JSONL with a text and a label per row.

Errors name the file, the line and the problem. The split is stratified and seeded, so a
silo's held-out set is the same every run and never enters training.
"""
from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from pathlib import Path

from crosslm_shared.errors import DataError

Examples = tuple[list[str], list[int]]


def load_examples(path: Path, *, labels: Sequence[str], text_column: str = "text",
                  label_column: str = "label") -> Examples:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; set [silo] data to your CSV or JSONL file")
    rows = _rows_jsonl(path) if path.suffix.lower() in (".jsonl", ".ndjson") else _rows_csv(path)
    texts, ys = [], []
    for line, row in rows:
        text, label = row.get(text_column), row.get(label_column)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{line}: missing or empty {text_column!r}")
        texts.append(text.strip())
        ys.append(_label_index(label, labels, f"{path}:{line}"))
    if len(texts) < 2 * len(labels):
        raise DataError(f"{path}: only {len(texts)} examples; need at least {2 * len(labels)}")
    return texts, ys


def _label_index(value, labels: Sequence[str], where: str) -> int:
    if isinstance(value, str) and value in labels:
        return labels.index(value)
    try:
        index = int(value)
    except (TypeError, ValueError):
        index = -1
    if 0 <= index < len(labels) and str(value).strip().lstrip("-").isdigit():
        return index
    raise DataError(f"{where}: label {value!r} is not one of {list(labels)} (or their index 0..{len(labels) - 1})")


def _rows_csv(path: Path):
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise DataError(f"{path}:1: empty file; expected a header row with text and label columns")
        for row in reader:
            yield reader.line_num, row


def _rows_jsonl(path: Path):
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object with text and label")
            yield line_no, row


def split(examples: Examples, *, heldout_fraction: float, seed: int) -> tuple[Examples, Examples]:
    """Stratified, seeded (train, held-out) split; every label keeps at least one example on each side."""
    texts, ys = examples
    rng = random.Random(seed)
    train, held = [], []
    for label in sorted(set(ys)):
        idx = [i for i, y in enumerate(ys) if y == label]
        rng.shuffle(idx)
        n_held = min(max(1, round(len(idx) * heldout_fraction)), len(idx) - 1)
        held += idx[:n_held]
        train += idx[n_held:]
    rng.shuffle(train)
    return ([texts[i] for i in train], [ys[i] for i in train]), ([texts[i] for i in sorted(held)],
                                                                  [ys[i] for i in sorted(held)])
