"""Reading TOML config files the same way on both sides."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from crosslm_shared.errors import ConfigError


def read_toml(path: str | Path, what: str, *, overrides: dict[str, dict[str, Any]] | None = None) -> dict:
    """Parse ``path`` (``what`` names it in errors: "server config", …) and apply flag overrides
    given as {section: {key: value}}; a ``None`` value means "flag not given"."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {e}") from e
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return raw
