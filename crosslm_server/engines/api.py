"""The contract between the worker and the ML engine that runs one CrossLM round.

The worker knows nothing of LLMs; the engine knows nothing of gRPC, the store or HTTP.
Engines are chosen in the server config (`[engine] name = ...`): a name in the registry, which
maps it to "module:Class", or such an import path itself (the tests' engines,
`tests/fakes/`); imported lazily, so a server running a test engine never imports the LLM stack.
Options from `[engine.options]` are passed as keyword arguments.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from crosslm_shared.errors import ConfigError
from crosslm_shared.records import EventKind, Value
from crosslm_shared.plugins import import_object, is_import_path

Emit = Callable[[EventKind, Mapping[str, Value]], None]


@dataclass(frozen=True)
class RoundRequest:
    submission_id: str
    silo: str
    task: str                           # task name, e.g. "rotten_tomatoes"
    slm_dir: Path                       # the submitted SLM: a validated save_pretrained folder (+ crosslm.json)
    peer_slm_dirs: Mapping[str, Path]   # latest accepted SLM folder of every silo on this task (incl. the submitter)
    work_dir: Path                      # scratch/output folder for this round; kept across a rerun


@dataclass(frozen=True)
class RoundOutcome:
    slm_dir: Path                       # enhanced SLM folder (same file layout) to bundle and send back
    metrics: Mapping[str, Value] = field(default_factory=dict)  # typed: crosslm_shared.records.typed_value


@runtime_checkable
class Engine(Protocol):
    def ready(self) -> bool:
        """True once models are loaded and a round can run."""

    def run_round(self, request: RoundRequest, emit: Emit) -> RoundOutcome:
        """Run one enhancement round; report progress with emit(kind, fields).

        kind: an EventKind (generating, scoring, scorer_dropped, training_llm, filtering,
        training_slm, evaluating_llm, resumed); another kind fails the round. Fields and metrics
        are typed values (numbers, strings, bools, flat lists) and reach the silo as they are.
        Progress is `done` of `total` (generating, training_llm); fields `tokens_per_s` and
        `kept` feed the server's metrics. Raise to fail the round: a CrossLMError's message is
        the reason the silo sees (paths cut to their last part), any other error is named by
        its type only.
        """

    # Optional (the worker uses them when an engine has them):
    #   task_labels(task) -> tuple[str, ...] | None   the served task's labels; None: not served
    #   check_slm(folder, manifest) -> Mapping         peer admission: raise BundleError unless the
    #                                                  uploaded SLM is usable (crosslm_server.engines.admission);
    #                                                  a module-level function (a staticmethod): the
    #                                                  service runs it in a separate, bounded process
    #   commit(request, outcome) -> Mapping            publish what the round changed (the LLM
    #                                                  adapter), called only once the round succeeded;
    #                                                  returns metrics to add
    #   discard(request) -> None                       the round failed after run_round began: undo
    #                                                  any change it made in memory


ENGINES: dict[str, str] = {
    "crosslm": "crosslm_server.engines.crosslm:CrossLMEngine",
}
def engine_path(name: str) -> str:
    """The "module:Class" that `[engine] name` stands for; ConfigError when it is neither a
    registered name nor an import path."""
    if name in ENGINES:
        return ENGINES[name]
    if is_import_path(name):
        return name
    raise ConfigError(f"[engine] name={name!r} is unknown; choose one of {sorted(ENGINES)} or give "
                      "module:Class on the Python path")


def create_engine(name: str, options: Mapping[str, Any] | None = None) -> Engine:
    """Import and construct the engine `name` stands for (may take minutes for an LLM)."""
    path = engine_path(name)
    cls = import_object(path, what=f"engine {name!r} ({path})")
    return cls(**dict(options or {}))
