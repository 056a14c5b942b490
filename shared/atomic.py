"""Writes that a crash leaves either undone or complete, never half done: write under a
``.partial`` name beside the target, then rename it into place."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def partial_name(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = partial_name(path)
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder path to fill; on success it replaces ``final`` whole."""
    tmp = partial_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
