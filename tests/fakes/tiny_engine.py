"""A miniature engine for tests and soak runs (`[engine] name = "fakes.tiny_engine:TinyEngine"`).

It walks the round's shape without an LLM: "generates" texts from templates, scores them
with the mean of every peer SLM's probabilities, pseudo-labels them, fine-tunes the
submitted SLM for a few steps and saves it. Loads any small BERT/MPNet folder from disk.
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from crosslm_server.engines.admission import check_slm
from crosslm_server.engines.api import Emit, RoundOutcome, RoundRequest
from crosslm_shared.errors import RoundError
from crosslm_shared.records import EventKind
from crosslm_shared.tasks import builtin_tasks, load_task

log = logging.getLogger(__name__)
TEXTS = ["good film", "great fun movie", "the best story", "bad boring plot", "awful dull film",
         "the worst movie", "free cash prize now", "call me later", "i love it", "i hate it"]


class TinyEngine:
    def __init__(self, *, load_seconds: float = 0.0, step_seconds: float = 0.0, steps: int = 2,
                 fail_silos: tuple[str, ...] | list[str] = (), tasks: Mapping[str, list[str]] | None = None,
                 adapters_dir: str | None = None):
        """load_seconds delays readiness (tests of /readyz); step_seconds slows each step;
        rounds for silos in fail_silos raise (tests of failure events); tasks maps the served
        task names to their labels (default: the built-in tasks and the tests' "rt" = neg, pos);
        adapters_dir: `commit` writes each round's "adapter" there (the round's pseudo-labels, a
        stand-in for LoRA weights) and returns its adapter_uri, so the store versions it."""
        self.step_seconds, self.steps, self.fail_silos = step_seconds, steps, set(fail_silos)
        self.adapters_dir = Path(adapters_dir) if adapters_dir else None
        self.tasks = {name: tuple(labels) for name, labels in
                      (tasks if tasks is not None else _default_tasks()).items()}
        self._ready = threading.Event()
        if load_seconds > 0:
            threading.Timer(load_seconds, self._ready.set).start()
        else:
            self._ready.set()

    def ready(self) -> bool:
        return self._ready.is_set()

    def task_labels(self, task: str) -> tuple[str, ...] | None:
        return self.tasks.get(task)

    check_slm = staticmethod(check_slm)  # module-level, so the service can run it in its checker process

    def run_round(self, request: RoundRequest, emit: Emit) -> RoundOutcome:
        if request.silo in self.fail_silos:
            raise RoundError(f"tiny engine told to fail rounds of silo {request.silo!r}")
        n = len(TEXTS)
        checkpoint = request.work_dir / "scored.json"  # a rerun (another worker) goes on from here
        if checkpoint.exists():
            saved = json.loads(checkpoint.read_text())
            emit(EventKind.RESUMED, {"stage": "training_llm"})
            pseudo, peers, mean = torch.tensor(saved["pseudo"]), saved["peers"], saved["mean_score"]
        else:
            pseudo, peers, mean = self._generate_and_score(request, emit)
            tmp = checkpoint.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pseudo": pseudo.tolist(), "peers": peers, "mean_score": mean}))
            tmp.replace(checkpoint)
        emit(EventKind.TRAINING_LLM, {"done": 1, "total": 1, "loss": 1.0})
        time.sleep(self.step_seconds)
        emit(EventKind.FILTERING, {"total": n})
        emit(EventKind.TRAINING_SLM, {"samples": n})
        out = request.work_dir / "slm"
        _fine_tune(request.slm_dir, out, TEXTS, pseudo, steps=self.steps, pause=self.step_seconds)
        (request.work_dir / "pseudo.json").write_text(json.dumps(pseudo.tolist()))
        return RoundOutcome(out, {"kept": n, "peers": peers, "mean_score": mean})

    def commit(self, request: RoundRequest, outcome: RoundOutcome) -> dict:
        """Publish the round's "adapter" (with adapters_dir): a file named by the submission, so a
        rerun writes the same one; the store numbers the versions."""
        if self.adapters_dir is None:
            return {}
        folder = self.adapters_dir / request.task
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{request.submission_id}.json"
        path.write_text((request.work_dir / "pseudo.json").read_text())
        return {"adapter_uri": path.as_uri()}

    def _generate_and_score(self, request: RoundRequest, emit: Emit) -> tuple[torch.Tensor, int, float]:
        n = len(TEXTS)
        for done in (n // 2, n):
            emit(EventKind.GENERATING, {"done": done, "total": n, "tokens_per_s": 100.0})
            time.sleep(self.step_seconds)
        emit(EventKind.SCORING, {"peers": len(request.peer_slm_dirs)})
        probs = {}
        for silo, path in request.peer_slm_dirs.items():
            p = _proba(path, TEXTS)
            if bool(torch.isfinite(p).all()):
                probs[silo] = p
            else:  # a scorer that went bad is left out of this round, the round goes on
                emit(EventKind.SCORER_DROPPED, {"silo": silo, "reason": "non-finite outputs"})
        if not probs:
            raise RoundError("every scorer gave non-finite outputs; the round cannot score")
        scores = sum(probs.values()) / len(probs)
        return scores.argmax(dim=-1), len(probs), float(scores.max(dim=-1).values.mean())


def _default_tasks() -> dict[str, list[str]]:
    return {name: list(load_task(name).label_names) for name in builtin_tasks()} | {"rt": ["neg", "pos"]}


def _proba(folder: Path, texts: list[str]) -> torch.Tensor:
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    temperature = json.loads((folder / "crosslm.json").read_text()).get("temperature", 1.0) \
        if (folder / "crosslm.json").exists() else 1.0
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")).logits
    return torch.softmax(logits / temperature, dim=-1)


def _fine_tune(src: Path, out: Path, texts: list[str], labels: torch.Tensor, *, steps: int, pause: float) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(pause)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if (src / "crosslm.json").exists():
        shutil.copyfile(src / "crosslm.json", out / "crosslm.json")

