"""Live progress of `crosslm demo`: one line whenever a silo or the server moves on.

A silo's line comes from its daemon's ``status.json`` (its phase, and the server's latest event
for its submission: which stage, done of total); the server's from its HTTP side (``/readyz``,
``/v1/submissions``, ``/metrics``). Lines are printed, not redrawn, so a log of the demo reads the
same as the terminal.
"""
from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from typing import Any, Callable

from crosslm_shared.records import EventKind, Stage

def _progress(f: dict) -> str:
    """Every engine reports progress as `done` of `total`."""
    return f"{f.get('done', '?')}/{f.get('total', '?')}"


SERVER_EVENTS: dict[str, Callable[[dict], str]] = {
    EventKind.QUEUED: lambda f: f"queued on the server (position {f.get('position', '?')})",
    EventKind.STARTED: lambda f: "the server started its round",
    EventKind.RESUMED: lambda f: f"the server resumed its round at {f.get('stage', '?')}",
    EventKind.GENERATING: lambda f: f"server: generating synthetic examples {_progress(f)}",
    EventKind.SCORING: lambda f: f"server: scoring {f.get('samples', '')} examples with every silo's SLM".replace("  ", " "),
    EventKind.TRAINING_LLM: lambda f: f"server: updating the LLM (LoRA) step {_progress(f)}",
    EventKind.FILTERING: lambda f: "server: filtering",
    EventKind.TRAINING_SLM: lambda f: f"server: enhancing its SLM on {f.get('samples', '?')} kept examples",
    EventKind.EVALUATING_LLM: lambda f: f"server: measuring the LLM ({f.get('texts', '?')} zero-shot texts, "
                                        f"{f.get('docs', '?')} perplexity documents)",
    EventKind.READY: lambda f: "enhanced SLM ready on the server",
    EventKind.FAILED: lambda f: f"round FAILED on the server: {f.get('reason', '?')}",
}


def arch_label(arch: str) -> str:
    """How a silo's architecture is shown: its name, or an import path's attribute in lower case
    (``fakes.tiny_slm:TINY`` -> ``tiny``)."""
    return arch.rpartition(":")[2].lower()

def describe(status: dict[str, Any]) -> str:
    """One silo daemon's status.json in words."""
    phase, r, n = status.get("phase"), status.get("round", 0), status.get("rounds", 0)
    at = f"round {r}/{n}: " if r else ""
    if phase == "loading data":
        return "loading its private data"
    if phase == "training":
        return f"training its {status.get('arch', '')} SLM on {status.get('examples', '?')} private examples"
    if phase == "uploading":
        return f"{at}uploading its SLM ({_mb(status.get('bytes', 0))})"
    if phase == "submitted":
        return f"{at}submitted"
    if phase == "server":
        kind = status.get("event", "")
        fields = status.get("fields", {})
        return at + SERVER_EVENTS.get(kind, lambda f: f"server: {kind} {f}")(fields)
    if phase == "downloading":
        return f"{at}downloading the enhanced SLM ({_mb(status.get('bytes', 0))})"
    if phase == "continuing":
        synthetic = status.get("synthetic", 0)
        return f"{at}continuing the enhanced SLM on its private data" + (
            f" and {synthetic} returned synthetic examples" if synthetic else "")
    if phase == "evaluating":
        return f"{at}kept the enhanced SLM; measuring it on its public test set"
    if phase == "round done":
        acc = status.get("test_accuracy")
        return f"{at}done, kept the {status.get('kept', '?')} SLM" + (f", test accuracy {100 * acc:.1f} %"
                                                                     if acc is not None else "")
    if phase == "done":
        return "finished all rounds"
    return str(phase)


class Progress:
    def __init__(self, layout, *, echo: Callable[[str], None], started: float, http_every_s: float = 2.0):
        self.layout, self.echo, self.started, self.http_every_s = layout, echo, started, http_every_s
        self.last: dict[str, str] = {}
        self.server_failure = ""  # set when /readyz says the engine failed to load
        self.next_http = 0.0
        self.width = max(len(f"{n} ({arch_label(a)})") for n, a in layout.archs.items())

    def update(self, *, final: bool = False) -> None:
        """Print what moved on; ``final`` polls the server now (its last state, e.g. every round
        done, is printed even when the rounds finished between two polls)."""
        for name, arch in self.layout.archs.items():
            try:
                status = json.loads((self.layout.out / name / "status.json").read_text())
            except (OSError, ValueError):
                continue
            self._say(name, f"{name} ({arch_label(arch)})", describe(status))
        if final or time.monotonic() >= self.next_http:
            self.next_http = time.monotonic() + self.http_every_s
            line, detail = self._server()
            self._say("server", "server", line, detail)

    def _say(self, key: str, who: str, line: str, detail: str = "") -> None:
        if line != self.last.get(key):
            self.last[key] = line
            elapsed = time.monotonic() - self.started
            self.echo(f"[{int(elapsed // 60):02d}:{int(elapsed % 60):02d}] {who:<{self.width}}  {line}{detail}")

    def _get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.layout.http_port}{path}"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.layout.operator_token}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def _server(self) -> tuple[str, str]:
        """(the line, shown only when it changes; a detail shown with it)."""
        try:
            code, body = self._get("/readyz")
            if code != 200:
                reason = json.loads(body).get("reason", "")
                if reason.startswith("engine failed to load"):
                    self.server_failure = reason
                return ("loading the LLM and measuring it" if reason == "engine is loading" else reason), ""
            subs = json.loads(self._get("/v1/submissions")[1])["submissions"]
            metrics = self._get("/metrics")[1]
        except (OSError, ValueError, KeyError):
            return "starting", ""
        total = len(self.layout.archs) * self.layout.rounds
        by_stage = {s: [x for x in subs if x["stage"] == s] for s in Stage}
        parts = [f"ready: {len(by_stage[Stage.READY])}/{total} rounds done"]
        for sub in by_stage[Stage.RUNNING]:
            parts.append(f"running {sub['silo']} round {_round_of(sub)}")
        if by_stage[Stage.QUEUED]:
            parts.append(f"{len(by_stage[Stage.QUEUED])} queued")
        if by_stage[Stage.FAILED]:
            parts.append(f"{len(by_stage[Stage.FAILED])} FAILED")
        # metrics are typed JSON values; a non-finite one is null (crosslm_shared.convert.submission_to_dict)
        measured = [x["metrics"] for x in by_stage[Stage.READY] if "llm_acc" in x["metrics"]]
        if measured:
            last = max(measured, key=lambda m: m["adapter_version"])
            parts.append(f"LLM zero-shot {_percent(last['llm_acc'])}, perplexity "
                         f"{_fixed(last['llm_ppl'])} after update {last['adapter_version']}")
        elif by_stage[Stage.READY] and "llm_base_acc" in by_stage[Stage.READY][0]["metrics"]:
            m = by_stage[Stage.READY][0]["metrics"]
            parts.append(f"LLM at start: zero-shot {_percent(m['llm_base_acc'])}, "
                         f"perplexity {_fixed(m['llm_base_ppl'])}")
        speed = re.search(r"^crosslm_generation_tokens_per_second (\S+)", metrics, re.M)
        tokens_per_s = float(speed.group(1)) if speed and by_stage[Stage.RUNNING] else 0.0
        detail = f" ({tokens_per_s:.0f} tokens/s)" if tokens_per_s else ""
        return "; ".join(parts), detail


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f} %"


def _fixed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _mb(size: int) -> str:
    return f"{size / 1e6:.0f} MB" if size >= 10e6 else f"{size / 1e6:.1f} MB"


def _round_of(sub: dict) -> str:
    """The daemon names uploads <silo>-r<round>-<hash>."""
    found = re.match(rf"{re.escape(sub['silo'])}-r(\d+)-", sub["upload_id"])
    return found.group(1) if found else "?"
