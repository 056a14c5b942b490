"""The real CrossLM engine behind the server's worker: one round per submission on the hosted LLM.

A round interrupted mid-way resumes from its last finished stage: the generated samples are
checkpointed in the round's work folder, and an adapter version already saved for the
submission means the LLM update is done (it is never applied twice).

It loads the LLM once (in a background thread, so the server answers health checks while it
loads), restores the current adapter version, and for each request runs
:func:`crosslm_server.round.run_round` with the submitter's SLM and the latest SLM of every silo
on the task, saves the enhanced SLM for the worker to bundle and a new adapter version.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from crosslm_server.adapters import AdapterStore
from crosslm_server.config import load_config
from crosslm_server.engine_api import Emit, RoundOutcome, RoundRequest
from crosslm_server.generate import Generation
from crosslm_server.llm import LLM, load_llm
from crosslm_server.round import run_round
from crosslm_shared.atomic import write_text_atomic
from crosslm_shared.errors import ConfigError, PreconditionError
from crosslm_shared.slm import load_slm
from crosslm_shared.tasks import TaskSpec, load_task

log = logging.getLogger(__name__)


class CrossLMEngine:
    """Options (``[engine.options]`` in the server TOML):

    - ``config``: a simulate-style TOML whose ``[llm]`` and ``[round.*]`` sections apply here;
    - ``tasks``: task names or TOML paths this server accepts (default the config's task);
    - ``adapters_dir``: where adapter versions live (default ``crosslm-data/adapters``);
    - ``set``: overrides like ``round.update.gamma_kl=0``;
    - ``background``: load the LLM in a thread (default true);
    - ``threads``: torch compute threads for rounds (default 0: torch's choice, every core). On a
      CPU server shared with other work, fewer threads than cores leave CPU to the request
      threads and keep torch's threads from spinning while a partner waits for a CPU
      (docs/performance.md).
    """

    def __init__(self, *, config: str | None = None, tasks: list[str] | None = None,
                 adapters_dir: str = "crosslm-data/adapters", set: list[str] | None = None,  # noqa: A002
                 background: bool = True, seed: int = 0, threads: int = 0):
        if threads < 0:
            raise ConfigError(f"[engine.options] threads={threads} is invalid; use 0 (torch's choice) or more")
        if threads:
            torch.set_num_threads(threads)
        self.cfg = load_config(config, list(set or []))
        names = tasks or [self.cfg.task]
        self.tasks: dict[str, TaskSpec] = {}
        for name in names:
            spec = load_task(name)
            self.tasks[spec.name] = spec
        self.adapters = AdapterStore(adapters_dir)
        self.seed = seed
        self.llm: LLM | None = None
        self.error: str | None = None
        self._version = 0  # the adapter version held in memory (0 = none, fresh LoRA)
        self._lock = threading.Lock()
        if background:
            threading.Thread(target=self._load, name="crosslm-llm-load", daemon=True).start()
        else:
            self._load()

    def _load(self) -> None:
        try:
            llm = load_llm(self.cfg.llm)
            self.llm = llm
            self._sync_adapter()
        except Exception as e:  # the reason surfaces through /readyz
            self.error = f"LLM failed to load: {e}"
            log.exception("LLM failed to load")

    def _sync_adapter(self) -> None:
        """Load the current adapter version if it is not the one in memory (start, or a rollback)."""
        current = self.adapters.current()
        version = current.version if current else 0
        if version != self._version:
            if current is not None:
                self.llm.load_adapter(current.path)
                log.info("LLM adapter version %d loaded (%s)", current.version, current.path)
            self._version = version

    def ready(self) -> bool:
        return self.llm is not None

    def status(self) -> str:
        return "ready" if self.llm else (self.error or "loading the LLM")

    def run_round(self, request: RoundRequest, emit: Emit) -> RoundOutcome:
        if self.llm is None:
            raise PreconditionError(f"the engine is not ready: {self.status()}")
        task = self.tasks.get(request.task)
        if task is None:
            raise ConfigError(f"task {request.task!r} is not served here; served: {sorted(self.tasks)}")
        with self._lock:
            return self._round(task, request, emit)

    def _round(self, task: TaskSpec, request: RoundRequest, emit: Emit) -> RoundOutcome:
        submitter = load_slm(request.slm_dir)
        if submitter.labels != task.label_names:
            raise ConfigError(f"the SLM's labels {submitter.labels} do not match task {task.name!r} "
                              f"labels {task.label_names}")
        peers = [load_slm(p) for p in request.peer_slm_dirs.values()] or [submitter]
        rcfg = self.cfg.round
        self._sync_adapter()
        applied = self.adapters.for_submission(request.submission_id)
        if applied is not None:
            # a rerun after a crash that followed the adapter save: never apply a round twice
            log.warning("submission %s: adapter v%d already holds this round; regenerating the SLM only",
                        request.submission_id, applied.version)
            self.llm.load_adapter(applied.path)
            self._version = applied.version
            rcfg = replace(rcfg, update=replace(rcfg.update, gamma_gen=0.0, gamma_task=0.0, gamma_kl=0.0))
        seed = self.seed + (int.from_bytes(request.submission_id.encode()[-4:], "little") % 100_000)
        work = Path(request.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = work / "generated.json"
        generated = Generation.from_json(json.loads(checkpoint.read_text())) if checkpoint.exists() else None
        if generated is not None:
            log.info("submission %s: resuming after generation (%d samples on disk)", request.submission_id,
                     len(generated.samples))
            emit("resumed", {"stage": "scoring", "samples": len(generated.samples)})
        res = run_round(self.llm, task, submitter, peers, rcfg, seed=seed, emit=emit, generated=generated,
                        on_generated=lambda g: write_text_atomic(checkpoint, json.dumps(g.to_json())))
        out = res.enhanced.save(work / "enhanced")
        metrics: dict[str, Any] = {k: v for k, v in res.metrics.items() if isinstance(v, (int, float, str))}
        metrics |= {f"seconds_{k}": v for k, v in res.metrics["seconds_per_stage"].items()}
        if applied is None:
            version = self.adapters.save(self.llm, submission_id=request.submission_id, silo=request.silo,
                                         task=task.name, metrics=metrics)
            self._version = version.version
            metrics["adapter_version"] = version.version
        log.info("silo %s submission %s: kept %d of %d, reward %.3f, kl %.4f", request.silo,
                 request.submission_id, res.metrics["kept"], res.metrics["generated"], res.metrics["reward_mean"],
                 res.metrics["kl"])
        return RoundOutcome(slm_dir=out, metrics=metrics)
