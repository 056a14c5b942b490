"""Objects named in a config by import path, ``module:attribute`` (a test engine, a model family)."""
from __future__ import annotations

import importlib
import re
from typing import Any

from crosslm_shared.errors import ConfigError

IMPORT_PATH = re.compile(r"[\w.]+:\w+")


def is_import_path(text: str) -> bool:
    return bool(IMPORT_PATH.fullmatch(text))


def import_object(path: str, *, what: str, hint: str = "") -> Any:
    """The attribute ``path`` names; ConfigError "<what> cannot be imported: <why><hint>" otherwise."""
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{what} cannot be imported: {e}{hint}") from e
