"""Reuse what several runs share (silo-only SLMs, the judge, the untouched LLM's figures, ZeroGen).

A study runs many arms on the same seeds: the baselines of a seed do not depend on the arm, so
they are computed once and kept under ``root/<name>-<key>``, the key a hash of the config parts
they depend on. Entries are written to a temporary name and renamed, so a run killed mid-way
leaves no half entry behind.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from crosslm_shared.atomic import atomic_dir, write_text_atomic
from crosslm_shared.slm import SLM, load_slm


def config_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ArtefactCache:
    def __init__(self, root: Path | None):
        self.root = root
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)

    def json(self, name: str, key: str, compute: Callable[[], dict]) -> dict:
        if self.root is None:
            return compute()
        path = self.root / f"{name}-{key}.json"
        if path.exists():
            return json.loads(path.read_text())
        value = compute()
        self.put_json(name, key, value)
        return value

    def put_json(self, name: str, key: str, value: dict) -> None:
        """Store (or complete) a JSON artefact, e.g. one cached before a figure was added to it."""
        if self.root is not None:
            write_text_atomic(self.root / f"{name}-{key}.json", json.dumps(value, default=float))

    def slm(self, name: str, key: str, compute: Callable[[], tuple[SLM, dict]]) -> tuple[SLM, dict]:
        if self.root is None:
            return compute()
        path = self.root / f"{name}-{key}"
        if (path / "crosslm.json").exists():
            slm = load_slm(path)
            return slm, slm.info
        slm, info = compute()
        with atomic_dir(path, replace=False) as tmp:  # same content whoever writes it
            slm.save(tmp)
        return slm, info
