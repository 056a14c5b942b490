"""An engine that hands the submitted SLM back unchanged (`[engine] name = "fakes.echo_engine:EchoEngine"`).

For transfer benchmarks and soak runs: the round costs nothing and imports no ML stack.
"""
from __future__ import annotations

import time

from crosslm_server.engines.api import Emit, RoundOutcome, RoundRequest
from crosslm_shared.records import EventKind


class EchoEngine:
    def __init__(self, *, step_seconds: float = 0.0):
        self.step_seconds = step_seconds

    def ready(self) -> bool:
        return True

    def run_round(self, request: RoundRequest, emit: Emit) -> RoundOutcome:
        emit(EventKind.TRAINING_SLM, {"samples": 0})
        time.sleep(self.step_seconds)
        return RoundOutcome(request.slm_dir, {"echo": 1})
