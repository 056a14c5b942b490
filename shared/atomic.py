"""Writes that a crash leaves either undone or complete, never half done: write under a
``.partial`` name beside the target, then rename it into place.

Each writer gets its own partial name (process and thread), so two processes filling the same
cache entry at once (two studies, two silo daemons on one machine) never tread on each
other's half-written files: the first to finish puts its copy in place, the other's is dropped.
"""

from __future__ import annotations

import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PARTIAL = ".partial"


def partial_name(path: Path) -> Path:
    """A name beside ``path`` that no other writer (process or thread) uses at the same time."""
    return path.with_name(f"{path.name}{PARTIAL}-{os.getpid()}-{threading.get_ident()}")


def is_partial(path: Path) -> bool:
    return PARTIAL in path.name


def write_text_atomic(path: Path, text: str) -> None:
    tmp = partial_name(path)
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def atomic_dir(final: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary folder path to fill; on success it replaces ``final`` whole.

    ``replace=False``: a ``final`` that another writer completed meanwhile is kept and this
    copy dropped (for caches of the same content)."""
    tmp = partial_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replace:
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:  # a concurrent writer's complete folder is in place (rename onto a non-empty dir)
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
