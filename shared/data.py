"""Load a task's labelled data and split it the way cross-silo holders of scarce data hold it.

One pool of unique examples is cut, with a seed, into disjoint parts: a shared test set for
the LLM, a pool for the independent judge (data no silo holds, used only for evaluation),
and per silo a private set (IID or label-skewed by a Dirichlet draw), split into train and a
held-out validation part, plus a test split for reporting. Validation data is used for
every selection (hyperparameters, temperature, keep-if-better); test data for nothing but
the figures. A real silo's daemon reads its own file with :func:`read_labelled` and cuts it
with :func:`heldout_split`, the same stratified cut, so simulated and real silos select their
models on the same kind of held-out split.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Iterator, Literal

import numpy as np

from crosslm_shared.assets import package_file
from crosslm_shared.errors import ConfigError, DataError
from crosslm_shared.schema import option
from crosslm_shared.tasks import DataSource, TaskSpec


@dataclass(frozen=True)
class Examples:
    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def label_counts(self, num_labels: int) -> list[int]:
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=num_labels).tolist()

    def subset(self, idx) -> "Examples":
        return Examples(tuple(self.texts[i] for i in idx), tuple(self.labels[i] for i in idx))

    def __add__(self, other: "Examples") -> "Examples":
        return Examples(self.texts + other.texts, self.labels + other.labels)

    def pair(self) -> tuple[list[str], list[int]]:
        """(texts, labels) as lists: what a silo's model family trains on."""
        return list(self.texts), list(self.labels)


@dataclass(frozen=True)
class SiloData:
    name: str
    train: Examples
    val: Examples
    test: Examples


@dataclass(frozen=True)
class Split:
    silos: tuple[SiloData, ...]
    llm_test: Examples
    judge_train: Examples


@dataclass(frozen=True)
class SplitConfig:
    """How the task's pool is cut (see module docstring)."""

    n_silos: int = option(4, "silos")
    n_private: int = option(128, "private examples per silo (train + validation)")
    val_fraction: float = option(0.25, "share of each silo's private examples held out for validation")
    n_test: int = option(300, "test examples per silo, for reports only")
    n_llm_test: int = option(400, "the LLM's zero-shot test set")
    n_judge: int = option(1000, "examples the judge (an SLM on data no silo holds) trains on")
    partition: Literal["iid", "dirichlet"] = option("dirichlet", "how labels are spread over the silos")
    alpha: float = option(0.5, "Dirichlet concentration; smaller = more label skew")
    min_per_label: int = option(2, "each silo gets at least this many of every label that has them left")

    def __post_init__(self) -> None:
        if self.partition not in ("iid", "dirichlet"):
            raise ConfigError(f"split.partition = {self.partition!r}; use 'iid' or 'dirichlet'")
        if self.n_silos < 1:
            raise ConfigError(f"split.n_silos = {self.n_silos}; need at least 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"split.val_fraction = {self.val_fraction}; must be in (0, 1)")
        if self.alpha <= 0:
            raise ConfigError(f"split.alpha = {self.alpha}; must be > 0")
        if self.n_private < 4:
            raise ConfigError(f"split.n_private = {self.n_private}; need at least 4")


def _open_text(path: Path, encoding: str) -> io.TextIOBase:
    if path.suffix == ".bz2":
        return io.TextIOWrapper(bz2.open(path), encoding=encoding, newline="")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


def source_path(source: DataSource) -> Path:
    if source.path:
        path = Path(source.path)
        if not path.exists():
            raise DataError(f"data file {path} does not exist")
        return path
    return package_file(source.package, source.file)


def iter_records(source: DataSource) -> Iterator[tuple[str, str]]:
    """Yield (text, raw label) pairs; a malformed line raises DataError naming file and line."""
    path = source_path(source)
    with _open_text(path, source.encoding) as fh:
        if source.format in ("csv", "tsv"):
            reader = csv.DictReader(fh, delimiter="\t" if source.format == "tsv" else ",")
            missing = {source.text_field, source.label_field} - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path}: header {reader.fieldnames} lacks the column(s) {sorted(missing)}")
            for row in reader:
                yield row[source.text_field] or "", (row[source.label_field] or "").strip()
        elif source.format == "jsonl":
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    yield str(row[source.text_field]), str(row[source.label_field]).strip()
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(
                        f"{path}, line {lineno}: expected a JSON object with "
                        f"{source.text_field!r} and {source.label_field!r} ({e})"
                    ) from e
        else:  # label_prefix: "LABEL<sep>sub text"
            for lineno, line in enumerate(fh, start=1):
                line = line.strip()
                if not line:
                    continue
                head, _, text = line.partition(" ")
                if source.label_sep not in head or not text:
                    raise DataError(f"{path}, line {lineno}: expected 'LABEL{source.label_sep}... text', got {line[:60]!r}")
                yield text, head.split(source.label_sep, 1)[0]


def load_examples(task: TaskSpec) -> Examples:
    """All usable examples of the task, labels as indices into ``task.labels``; deduplicated by text."""
    index = {name: i for i, name in enumerate(task.label_names)}
    mapping = task.data.label_map or {name: name for name in task.label_names}
    unknown = set(mapping.values()) - set(index)
    if unknown:
        raise ConfigError(f"task {task.name!r}: data.label_map maps to unknown labels {sorted(unknown)}")
    seen: set[str] = set()
    texts: list[str] = []
    labels: list[int] = []
    for text, raw in iter_records(task.data):
        text = " ".join(text.split())
        if raw not in mapping or not text:
            continue
        key = text.lower()
        if task.data.dedup and key in seen:
            continue
        seen.add(key)
        texts.append(text)
        labels.append(index[mapping[raw]])
    if not texts:
        raise DataError(f"task {task.name!r}: no usable examples in {source_path(task.data)}")
    return Examples(tuple(texts), tuple(labels))


def _take(pool: list[int], n: int) -> list[int]:
    if n > len(pool):
        raise ConfigError(f"the split asks for {n} more examples but only {len(pool)} are left; lower the counts")
    out = pool[:n]
    del pool[:n]
    return out


def _dirichlet_counts(rng: np.random.Generator, n: int, k: int, alpha: float, min_per_label: int,
                      available: list[int]) -> list[int]:
    """Label counts for one silo's private draw: ``min_per_label`` of each label that has them
    left, the rest by a Dirichlet mix. A label the mix asks more of than is left (TREC's ABBR: 86
    of 5,452) gives all it has, and the shortfall is drawn again over the labels that have examples
    left, in the same mix: the silo keeps its size and its skew, as a real silo short of one kind
    of record would."""
    if n < min_per_label * k:
        raise ConfigError(f"split.n_private = {n} is smaller than min_per_label * labels = {min_per_label * k}")
    base = [min(min_per_label, a) for a in available]
    rest = n - sum(base)
    p = rng.dirichlet([alpha] * k)
    counts = [b + int(e) for b, e in zip(base, rng.multinomial(rest, p))]
    while True:
        shortfall = sum(max(0, c - a) for c, a in zip(counts, available))
        if shortfall == 0:
            return counts
        counts = [min(c, a) for c, a in zip(counts, available)]
        room = np.array([a - c for c, a in zip(counts, available)], dtype=float)
        if room.sum() < shortfall:
            raise ConfigError(f"the split asks for {n} private examples per silo but only "
                              f"{sum(available)} are left; lower split.n_private or split.n_test")
        weights = np.where(room > 0, p, 0.0)
        weights = weights / weights.sum() if weights.sum() > 0 else (room > 0) / (room > 0).sum()
        counts = [c + int(e) for c, e in zip(counts, rng.multinomial(shortfall, weights))]


def split_task(examples: Examples, num_labels: int, cfg: SplitConfig, *, seed: int) -> Split:
    """Cut ``examples`` into disjoint LLM-test, judge and per-silo parts (see module docstring)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(examples)).tolist()
    llm_test = examples.subset(_take(order, cfg.n_llm_test))
    judge = examples.subset(_take(order, cfg.n_judge))
    # every test split first, from the global order: drawing them after some silos' private
    # data would leave them short of the labels those silos took (measured: 0 spam in 300)
    tests = [_take(order, cfg.n_test) for _ in range(cfg.n_silos)]
    by_label: list[list[int]] = [[] for _ in range(num_labels)]
    for i in order:
        by_label[examples.labels[i]].append(i)
    silos = []
    for s in range(cfg.n_silos):
        test_idx = tests[s]
        if cfg.partition == "iid":
            private_idx = _take(order, cfg.n_private)
            for i in private_idx:
                by_label[examples.labels[i]].remove(i)
        else:
            counts = _dirichlet_counts(rng, cfg.n_private, num_labels, cfg.alpha, cfg.min_per_label,
                                       [len(pool) for pool in by_label])
            private_idx = []
            for lab, c in enumerate(counts):
                private_idx += by_label[lab][:c]
                del by_label[lab][:c]
            taken = set(private_idx)
            order[:] = [i for i in order if i not in taken]
        private = examples.subset(private_idx)
        train_idx, val_idx = _stratified_cut(private.labels, cfg.val_fraction, rng)
        silos.append(SiloData(
            name=f"silo{s + 1}",
            train=private.subset(train_idx),
            val=private.subset(val_idx),
            test=examples.subset(test_idx),
        ))
    return Split(silos=tuple(silos), llm_test=llm_test, judge_train=judge)


def read_labelled(path: Path, *, labels: Sequence[str], text_column: str = "text",
                  label_column: str = "label") -> Examples:
    """A silo's own CSV or JSONL file, a text and a label (its name or index) per row; errors name
    the file, the line and the problem."""
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
    return Examples(tuple(texts), tuple(ys))


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


def heldout_split(examples: Examples, *, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """A silo's (train, held-out) split: the cut `split_task` gives each simulated silo, seeded, so the
    held-out set is the same every run and never enters training."""
    train_idx, val_idx = _stratified_cut(examples.labels, fraction, np.random.default_rng(seed))
    return examples.subset(train_idx), examples.subset(val_idx)


def _stratified_cut(labels, fraction: float, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Hold out ``fraction`` of each label (at least one where a label has two or more)."""
    train, val = [], []
    for lab in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == lab]
        rng.shuffle(idx)
        n_val = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val += idx[:n_val]
        train += idx[n_val:]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def shuffled(examples: Examples, seed: int) -> Examples:
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    return examples.subset(idx)
