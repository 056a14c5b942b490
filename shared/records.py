"""Frozen records that the store, the service and the client pass around (no protobuf here)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from crosslm_shared.bundle import Manifest

TERMINAL_STAGES = frozenset({"ready", "failed"})
TERMINAL_EVENTS = frozenset({"ready", "failed"})


def _frozen(mapping: Mapping | None) -> Mapping:
    return MappingProxyType(dict(mapping or {}))


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
    stage: str
    created_at: float
    updated_at: float
    error: str = ""
    result: Manifest | None = None
    metrics: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", _frozen(self.metrics))

    @property
    def terminal(self) -> bool:
        return self.stage in TERMINAL_STAGES


@dataclass(frozen=True)
class Event:
    submission_id: str
    seq: int
    kind: str
    time: float
    fields: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", _frozen(self.fields))
