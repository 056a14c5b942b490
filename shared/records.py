"""Frozen records that the store, the service and the client pass around (no protobuf here).

Stage and event-kind names are defined here once (`Stage`, `EventKind`; the wire's enums of the
same names mirror them, crosslm_shared.convert maps one to the other). Round metrics and event
fields are typed values (`Value`): what an engine reports is what a silo reads, with no trip
through strings.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Union

from crosslm_shared.bundle import Manifest
from crosslm_shared.errors import RecordValueError


class Stage(StrEnum):
    """Where a submission is: queued -> running -> ready | failed (the store keeps the value)."""

    QUEUED = "queued"
    RUNNING = "running"
    READY = "ready"
    FAILED = "failed"


class EventKind(StrEnum):
    """What an event of a submission says (docs/service.md, Events). The service emits queued,
    started, ready and failed; engines emit the others."""

    QUEUED = "queued"
    STARTED = "started"
    RESUMED = "resumed"
    GENERATING = "generating"
    SCORING = "scoring"
    SCORER_DROPPED = "scorer_dropped"
    TRAINING_LLM = "training_llm"
    FILTERING = "filtering"
    TRAINING_SLM = "training_slm"
    EVALUATING_LLM = "evaluating_llm"
    READY = "ready"
    FAILED = "failed"


_KIND_NAMES = frozenset(k.value for k in EventKind)
TERMINAL_STAGES = frozenset({Stage.READY, Stage.FAILED})
TERMINAL_EVENTS = frozenset({EventKind.READY, EventKind.FAILED})

# A metric or event field: what crosslm.v1.Value carries. Lists are tuples (records are frozen).
Value = Union[float, int, str, bool, tuple[float, ...], tuple[int, ...], tuple[str, ...]]
_INT64 = 1 << 63


def typed_value(key: str, value: object) -> Value:
    """`value` as one of the wire's types: bool, int (64-bit), float, str, or a flat list of ints,
    floats (ints among floats widen) or strings. numpy scalars become Python numbers. Raises
    RecordValueError naming `key` for anything else, so an engine learns which metric to fix."""
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        if not -_INT64 <= int(value) < _INT64:
            raise RecordValueError(f"{key!r} = {value} does not fit in 64 bits: report it as a float")
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        items = tuple(typed_value(key, v) for v in value)
        kinds = {type(v) for v in items}
        if kinds <= {int}:
            return items
        if kinds <= {int, float}:
            return tuple(float(v) for v in items)
        if kinds == {str}:
            return items
    raise RecordValueError(f"{key!r} = {value!r} cannot travel: a metric or event field is a number, a string, "
                           "a bool or a flat list of numbers or of strings")


def typed_values(mapping: Mapping[str, object] | None) -> Mapping[str, Value]:
    """A frozen mapping of `typed_value`s; keys must be strings."""
    out = {}
    for key, value in (mapping or {}).items():
        if not isinstance(key, str):
            raise RecordValueError(f"metric or event field name {key!r} is a {type(key).__name__}: use a string")
        out[key] = typed_value(key, value)
    return MappingProxyType(out)


def event_kind(kind: str) -> EventKind:
    """The EventKind named `kind`; RecordValueError for a name that is none (an engine's typo)."""
    try:
        return EventKind(kind)
    except ValueError:
        raise RecordValueError(f"event kind {kind!r} is unknown: use one of "
                               f"{[k.value for k in EventKind]} (crosslm_shared.records.EventKind)") from None


@dataclass(frozen=True)
class Upload:
    upload_id: str
    silo: str
    manifest: Manifest
    complete: bool = False
    created_at: float = 0.0


@dataclass(frozen=True)
class Submission:
    submission_id: str
    upload_id: str
    silo: str
    task: str
    stage: Stage
    created_at: float
    updated_at: float
    error: str = ""
    result: Manifest | None = None
    metrics: Mapping[str, Value] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage", Stage(self.stage))
        object.__setattr__(self, "metrics", typed_values(self.metrics))

    @property
    def terminal(self) -> bool:
        return self.stage in TERMINAL_STAGES


@dataclass(frozen=True)
class Event:
    submission_id: str
    seq: int
    kind: EventKind | str  # an EventKind; a name this code does not know (from a newer server) stays a str
    time: float
    fields: Mapping[str, Value] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind in _KIND_NAMES:
            object.__setattr__(self, "kind", EventKind(self.kind))
        object.__setattr__(self, "fields", typed_values(self.fields))
