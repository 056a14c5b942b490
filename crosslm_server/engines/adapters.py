"""Versioned LoRA adapters: one folder per applied round, and a pointer to the current one.

Layout under ``root``: ``v00001/`` … (peft's ``adapter_model.safetensors`` + ``adapter_config.json``
+ ``crosslm.json`` with round, submission and metrics) and ``CURRENT`` (the version in use).
Every write goes to a temporary name and is renamed, so a crash leaves either the old or the
new state. The submission id in each version makes a re-run round detectable: a round whose
update is already saved is never applied to the adapter twice.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from crosslm_shared.atomic import atomic_dir, is_partial, write_text_atomic
from crosslm_shared.errors import NotFoundError

META = "crosslm.json"


@dataclass(frozen=True)
class AdapterVersion:
    version: int
    path: Path
    meta: dict


class AdapterStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def versions(self) -> list[AdapterVersion]:
        out = []
        for p in sorted(self.root.glob("v[0-9]*")):
            if (p / META).exists() and not is_partial(p):
                out.append(AdapterVersion(int(p.name[1:]), p, json.loads((p / META).read_text())))
        return out

    def current(self) -> AdapterVersion | None:
        pointer = self.root / "CURRENT"
        versions = {v.version: v for v in self.versions()}
        if pointer.exists():
            v = int(pointer.read_text().strip() or 0)
            return versions.get(v)
        return versions[max(versions)] if versions else None

    def for_submission(self, submission_id: str) -> AdapterVersion | None:
        return next((v for v in self.versions() if v.meta.get("submission_id") == submission_id), None)

    def save(self, llm, *, submission_id: str, silo: str, task: str, metrics: dict) -> AdapterVersion:
        versions = self.versions()
        n = (versions[-1].version + 1) if versions else 1
        final = self.root / f"v{n:05d}"
        meta = {"version": n, "submission_id": submission_id, "silo": silo, "task": task,
                "saved_at": time.time(), "metrics": metrics}
        with atomic_dir(final) as tmp:
            llm.save_adapter(tmp)
            (tmp / META).write_text(json.dumps(meta, indent=2, default=float))
        self._point(n)
        return AdapterVersion(n, final, meta)

    def rollback(self, version: int) -> AdapterVersion:
        """Make ``version`` current; later versions stay on disk (a rollback can be undone)."""
        found = {v.version: v for v in self.versions()}
        if version not in found:
            raise NotFoundError(f"adapter version {version} does not exist; versions: {sorted(found) or 'none'}")
        self._point(version)
        return found[version]

    def _point(self, version: int) -> None:
        write_text_atomic(self.root / "CURRENT", str(version))
