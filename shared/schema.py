"""One way to declare, load, document and write every CrossLM config file.

A section is a frozen dataclass whose fields are declared with :func:`option`: the default, one
line of help, and whether the value is a path (resolved against the config file's folder), in
``field(metadata=...)`` as peft declares its configs. :func:`build` turns a TOML table into the
dataclass, naming the section and the key of anything wrong (an unknown key, a value of the
wrong type, an old name); :func:`describe` writes the reference tables of docs/config.md and
:func:`flag_help` the ``--help`` of the flags that override a key, from the same declarations;
:func:`to_toml` writes a section back (tomli-w). No torch here: reading a config must not load
the ML stack.
"""
from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from crosslm_shared.errors import ConfigError

log = logging.getLogger(__name__)


def option(default: Any = MISSING, help: str = "", *, path: bool = False,  # noqa: A002
           factory: Any = MISSING) -> Any:
    """A config field: ``grpc_port: int = option(50051, "gRPC port (0 = any free port)")``."""
    if not help:
        raise TypeError("every config option needs a line of help")
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help, "path": path})


@dataclass(frozen=True)
class Renamed:
    """An old key still accepted for one release: ``old`` in the file is read as ``new``."""

    old: str
    new: str
    until: str = "0.3"


def help_of(cls: type, name: str) -> str:
    return {f.name: f for f in fields(cls)}[name].metadata.get("help", "")


def flag_help(cls: type, section: str, name: str) -> str:
    """``--help`` text of a flag that overrides ``[section] name``."""
    return f"override [{section}] {name}: {help_of(cls, name)} (default: from the file)"


_NAMES = {bool: "true or false", int: "integer", float: "number", str: "string", Path: "path",
          type(None): "none"}


def _hint_name(hint: Any) -> str:
    """What a value of this type looks like in TOML, in words."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_hint_name(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"list of {_hint_name(typing.get_args(hint)[0])}"
    if origin is dict:
        return "table"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _type_ok(hint: Any, value: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(a, value) for a in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_type_ok(args[0], v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is Path:
        return isinstance(value, (str, Path))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _convert(hint: Any, value: Any) -> Any:
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        return tuple(float(v) if typing.get_args(hint)[0] is float else v for v in value)
    if hint is float and isinstance(value, int):
        return float(value)
    return value


def _nested(hint: Any) -> type | None:
    return hint if dataclasses.is_dataclass(hint) else None


def build(cls: type, raw: Any, where: str, *, base: Path | None = None) -> Any:
    """``cls`` from the TOML table ``raw`` found at ``[where]``; paths relative to ``base``."""
    label = where or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"[{label}] must be a table, got {raw!r}")
    raw = dict(raw)
    for r in getattr(cls, "RENAMED", ()):
        if r.old in raw:
            if r.new in raw:
                raise ConfigError(f"[{label}] sets both {r.old} and {r.new}; {r.old} is the old name of "
                                  f"{r.new}: keep {r.new} only")
            log.warning("[%s] %s is now %s; the old name is read until %s", label, r.old, r.new, r.until)
            raw[r.new] = raw.pop(r.old)
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"[{label}] has unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in raw.items():
        hint, key = hints[name], f"{where}.{name}" if where else name
        nested = _nested(hint)
        if nested is not None:
            kwargs[name] = build(nested, value, key, base=base)
            continue
        if not _type_ok(hint, value):
            raise ConfigError(f"[{label}] {name} = {value!r}: expected {_hint_name(hint)} "
                              f"({help_of(cls, name)})")
        value = _convert(hint, value)
        if known[name].metadata.get("path") and value is not None:
            value = Path(value) if base is None else (base / Path(value)).resolve()
        kwargs[name] = value
    for f in known.values():  # a required section left out: its own checks say what it needs
        if f.name not in kwargs and _default(f) is MISSING and _nested(hints[f.name]) is not None:
            kwargs[f.name] = build(hints[f.name], {}, f"{where}.{f.name}" if where else f.name, base=base)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key missing
        raise ConfigError(f"[{label}]: {e}") from e


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Path):
        return f'"{value}"'
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return repr(value)


def describe(cls: type, section: str, *, only: typing.Collection[str] | None = None) -> list[str]:
    """Markdown: one table per section (nested sections after it), every key with its type,
    default and help; ``only`` keeps those fields of ``cls``."""
    hints = typing.get_type_hints(cls)
    rows, nested = [], []
    for f in fields(cls):
        if not f.init or (only is not None and f.name not in only):
            continue
        if _nested(hints[f.name]) is not None:
            nested.append((hints[f.name], f"{section}.{f.name}" if section else f.name))
            continue
        default = _default(f)
        shown = "required" if default is MISSING else ("none" if default is None else _toml_value(default))
        helptext = f.metadata.get("help", "").replace("|", "\\|")
        rows.append(f"| `{f.name}` | {_hint_name(hints[f.name])} | `{shown}` | {helptext} |")
    lines = []
    if rows:
        lines = [f"### `[{section}]`" if section else "### top level", "",
                 "| key | type | default | meaning |", "|---|---|---|---|", *rows]
        renamed = getattr(cls, "RENAMED", ())
        if renamed:
            lines += ["", "Old names still read (with a warning): " +
                      ", ".join(f"`{r.old}` → `{r.new}` (until {r.until})" for r in renamed) + "."]
        lines.append("")
    for sub, name in nested:
        lines += describe(sub, name)
    return lines


def as_table(obj: Any) -> dict:
    """A config dataclass as a TOML-ready table: paths as strings, tuples as lists, unset
    (None) keys left out, nested sections as sub-tables."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = as_table(value)
        elif value is None:
            continue
        elif isinstance(value, Path):
            out[f.name] = str(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def to_toml(table: dict) -> str:
    """Write a table (e.g. from :func:`as_table`) as TOML, by tomli-w."""
    import tomli_w

    return tomli_w.dumps(table)
