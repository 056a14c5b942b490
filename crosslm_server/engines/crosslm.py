"""The real CrossLM engine behind the server's worker: one round per submission on the hosted LLM.

A round interrupted mid-way resumes from its last finished stage: the generated samples are
checkpointed in the round's work folder, and an adapter version already saved for the
submission means the LLM update is done (it is never applied twice).

It loads the LLM once (in a background thread, so the server answers health checks while it
loads), restores the current adapter version, and for each request runs
:func:`crosslm_server.method.round.run_round` with the submitter's SLM and the latest SLM of every silo
on the task, saves the enhanced SLM for the worker to bundle and a new adapter version.

With ``eval_data`` it also measures the LLM itself (DESIGN.md §2, evaluation): raw zero-shot
accuracy with the rate of each predicted label on that test set, and perplexity on the general
corpus, once at load (``llm_base_*`` in every round's metrics) and after every ``eval_every``-th
adapter version (``llm_*`` in that round's metrics).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from crosslm_server.engines.adapters import AdapterStore
from crosslm_server.engines.admission import check_slm
from crosslm_server.method.config import load_engine_config
from crosslm_server.engines.api import Emit, RoundOutcome, RoundRequest
from crosslm_server.method.evaluate import general_corpus, perplexity, zero_shot
from crosslm_server.method.generate import Generation
from crosslm_server.method.llm import LLM, load_llm
from crosslm_server.method.pool import SyntheticPool
from crosslm_server.method.round import run_round
from crosslm_shared.atomic import write_text_atomic
from crosslm_shared.bundle import SYNTHETIC_FILE, write_synthetic
from crosslm_shared.data import load_examples
from crosslm_shared.errors import ConfigError, PreconditionError
from crosslm_shared.records import EventKind
from crosslm_shared.slm import load_slm
from crosslm_shared.tasks import DataSource, TaskSpec, load_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSet:
    """What the LLM is measured on: a task's zero-shot test texts and the general corpus."""

    task: TaskSpec
    texts: list[str]
    labels: list[int]
    docs: list[str]


class CrossLMEngine:
    """Options (``[engine.options]`` in the server TOML):

    - ``config``: the round's TOML (:class:`~crosslm_server.method.config.EngineConfig`: ``task``,
      ``[llm]``, ``[round.*]``, ``[eval]``, ``continue_on``, ``synthetic_pool``); a simulate config
      may stand in, and the server names the keys of it that it does not use;
    - ``tasks``: task names or TOML paths this server accepts (default the config's task);
    - ``adapters_dir``: where adapter versions live (default ``crosslm-data/adapters``);
    - ``synthetic_dir``: the task's synthetic pool (default ``synthetic`` beside ``adapters_dir``);
    - ``set``: overrides like ``round.update.gamma_kl=0``;
    - ``eval_data``: a CSV or JSONL (``text``, ``label`` columns, label names) of the first task's
      examples that no silo holds: the LLM's zero-shot test set (default none: no LLM figures);
    - ``eval_texts``: use only its first N texts (default 0: all);
    - ``eval_every``: measure the LLM after every N-th adapter version (default 1);
    - ``background``: load the LLM in a thread (default true);
    - ``threads``: torch compute threads for rounds (default 0: torch's choice, every core). On a
      CPU server shared with other work, fewer threads than cores leave CPU to the request
      threads and keep torch's threads from spinning while a partner waits for a CPU
      (docs/performance.md).
    """

    def __init__(self, *, config: str | None = None, tasks: list[str] | None = None,
                 adapters_dir: str = "crosslm-data/adapters", set: list[str] | None = None,  # noqa: A002
                 eval_data: str | None = None, eval_texts: int = 0, eval_every: int = 1,
                 background: bool = True, seed: int = 0, synthetic_dir: str | None = None, threads: int = 0):
        if threads < 0:
            raise ConfigError(f"[engine.options] threads={threads} is invalid; use 0 (torch's choice) or more")
        if threads:
            torch.set_num_threads(threads)
        self.cfg = load_engine_config(config, list(set or []))
        names = tasks or [self.cfg.task]
        self.tasks: dict[str, TaskSpec] = {}
        for name in names:
            spec = load_task(name)
            self.tasks[spec.name] = spec
        if eval_every < 1:
            raise ConfigError(f"engine option eval_every = {eval_every}; must be >= 1")
        self.eval_every = eval_every
        self.eval_set = self._eval_set(Path(eval_data), eval_texts) if eval_data else None
        self.baseline: dict[str, Any] = {}  # the LLM's figures at load
        self.adapters = AdapterStore(adapters_dir)
        self.pool = SyntheticPool(synthetic_dir or Path(adapters_dir).parent / "synthetic")
        self.seed = seed
        self.llm: LLM | None = None
        self.error: str | None = None
        self._version = 0  # the adapter version held in memory (0 = none, fresh LoRA)
        self._pending: _Pending | None = None  # the round run but not yet committed or discarded
        self._lock = threading.Lock()
        self._ready = threading.Event()
        if background:
            threading.Thread(target=self._load, name="crosslm-llm-load", daemon=True).start()
        else:
            self._load()

    def _eval_set(self, path: Path, limit: int) -> EvalSet:
        if not path.is_file():
            raise ConfigError(f"engine option eval_data = {str(path)!r} does not exist; write it with "
                              "`crosslm-client prepare-demo` (public/llm-test.csv) or give a CSV / JSONL with "
                              "text and label columns that no silo holds")
        task = next(iter(self.tasks.values()))
        fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "csv"
        examples = load_examples(replace(task, data=DataSource(format=fmt, path=str(path))))
        if limit > 0:
            examples = examples.subset(range(min(limit, len(examples))))
        return EvalSet(task, list(examples.texts), list(examples.labels), general_corpus(self.cfg.eval.n_ppl_docs))

    def _load(self) -> None:
        try:
            llm = load_llm(self.cfg.llm)
            self.llm = llm
            self._sync_adapter()
            if self.eval_set is not None:
                self.baseline = self._evaluate("llm_base")
                log.info("LLM at load (adapter v%d): %s", self._version, self.baseline)
            self._ready.set()
        except Exception as e:  # the reason surfaces through /readyz
            self.error = f"LLM failed to load: {e}"
            log.exception("LLM failed to load")

    def _evaluate(self, prefix: str) -> dict[str, Any]:
        """The LLM as it is now: zero-shot accuracy and label rates, perplexity (metric names under ``prefix``)."""
        e, ecfg = self.eval_set, self.cfg.eval
        zs = zero_shot(self.llm, e.task, e.texts, e.labels, batch_size=ecfg.batch_size)
        ppl = perplexity(self.llm, e.docs, max_tokens=ecfg.ppl_max_tokens)
        figures = {f"{prefix}_acc": zs["acc"], f"{prefix}_ppl": ppl, f"{prefix}_eval_texts": len(e.texts),
                   f"{prefix}_eval_docs": len(e.docs)}
        return figures | {f"{prefix}_rate_{label}": rate for label, rate in zs["pred_rate"].items()}

    def _sync_adapter(self) -> None:
        """Load the current adapter version if it is not the one in memory (start, or a rollback)."""
        current = self.adapters.current()
        version = current.version if current else 0
        if version != self._version:
            if current is not None:
                self.llm.load_adapter(current.path)
                log.info("LLM adapter version %d loaded (%s)", current.version, current.path)
            self._version = version

    def _attach_synthetic(self, out: Path, task: TaskSpec, submission_id: str, kept) -> None:
        """Send the synthetic set back with the SLM: the task's pool (this round included) or this round's."""
        if self.cfg.continue_on != "private+synthetic":
            return
        texts, targets = kept
        if self.cfg.synthetic_pool:
            self.pool.add(task.name, submission_id, texts, targets)
            texts, targets = self.pool.get(task.name, task.num_labels)
        write_synthetic(out / SYNTHETIC_FILE, texts, targets)

    def ready(self) -> bool:
        return self._ready.is_set()

    def status(self) -> str:
        return "ready" if self.ready() else (self.error or "loading the LLM")

    def task_labels(self, task: str) -> tuple[str, ...] | None:
        spec = self.tasks.get(task)
        return tuple(spec.label_names) if spec is not None else None

    check_slm = staticmethod(check_slm)  # module-level, so the service can run it in its checker process

    def run_round(self, request: RoundRequest, emit: Emit) -> RoundOutcome:
        if not self.ready():
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
        peers = []
        for silo, path in request.peer_slm_dirs.items():
            peer = submitter if Path(path) == Path(request.slm_dir) else load_slm(path)
            peers.append(replace(peer, info=dict(peer.info) | {"silo": silo}))  # named if it is dropped
        rcfg = self.cfg.round
        self._sync_adapter()
        # what a failed or rejected round restores (no change in memory unless `commit` publishes)
        self._pending = _Pending(request.submission_id, self.llm.adapter_state(), self._version, task, emit)
        applied = self.adapters.for_submission(request.submission_id)
        if applied is not None:
            # a rerun after a crash that followed the adapter save: never apply a round twice
            log.warning("submission %s: adapter v%d already holds this round; regenerating the SLM only",
                        request.submission_id, applied.version)
            self.llm.load_adapter(applied.path)
            self._version = applied.version
        seed = self.seed + (int.from_bytes(request.submission_id.encode()[-4:], "little") % 100_000)
        work = Path(request.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = work / "generated.json"
        generated = Generation.from_json(json.loads(checkpoint.read_text())) if checkpoint.exists() else None
        if generated is not None:
            log.info("submission %s: resuming after generation (%d samples on disk)", request.submission_id,
                     len(generated.samples))
            emit(EventKind.RESUMED, {"stage": EventKind.SCORING.value, "samples": len(generated.samples)})
        res = run_round(self.llm, task, submitter, peers or [submitter], rcfg, seed=seed, emit=emit,
                        generated=generated, update=applied is None,
                        on_generated=lambda g: write_text_atomic(checkpoint, json.dumps(g.to_json())))
        out = res.enhanced.save(work / "enhanced")
        self._attach_synthetic(out, task, request.submission_id, res.synthetic)
        # numbers, strings and lists (reward_hist, kept_per_label) travel as they are
        metrics: dict[str, Any] = {k: v for k, v in res.metrics.items() if isinstance(v, (int, float, str, list))}
        metrics |= {f"seconds_{k}": v for k, v in res.metrics["seconds_per_stage"].items()}
        self._pending.applied = applied is not None
        self._pending.metrics = metrics
        metrics |= self.baseline
        log.info("silo %s submission %s: kept %d of %d, reward %.3f, kl %.4f", request.silo,
                 request.submission_id, res.metrics["kept"], res.metrics["generated"], res.metrics["reward_mean"],
                 res.metrics["kl"])
        return RoundOutcome(slm_dir=out, metrics=metrics)

    def commit(self, request: RoundRequest, outcome: RoundOutcome) -> dict[str, Any]:
        """The round succeeded: publish its LLM update as a new adapter version, unless it must
        not change the LLM (every reward NaN, or no sample kept): then the LLM is restored."""
        with self._lock:
            pending = self._take_pending(request)
            if pending.applied:
                return {}
            metrics = pending.metrics
            reward_mean, kept = float(metrics.get("reward_mean", float("nan"))), int(metrics.get("kept", 0))
            if not math.isfinite(reward_mean) or kept == 0:
                self._restore(pending)
                why = "no finite reward" if not math.isfinite(reward_mean) else "no sample kept"
                log.warning("submission %s: %s, the LLM is left as it was (adapter v%d)", request.submission_id,
                            why, self._version)
                # adapter_version: the version the LLM holds after this round (unchanged; 0 = none yet)
                return {"llm_updated": 0, "llm_not_updated": why, "adapter_version": self._version}
            version = self.adapters.save(self.llm, submission_id=request.submission_id, silo=request.silo,
                                         task=pending.task.name, metrics=metrics)
            self._version = version.version
            # adapter_uri: where the version lies, for a shared store's version record (never sent to a silo)
            extra: dict[str, Any] = {"adapter_version": version.version, "llm_updated": 1,
                                     "adapter_uri": version.path.resolve().as_uri()}
            if self.eval_set is not None and version.version % self.eval_every == 0:
                pending.emit(EventKind.EVALUATING_LLM, {"texts": len(self.eval_set.texts), "docs": len(self.eval_set.docs)})
                extra |= self._evaluate("llm")
                log.info("LLM after adapter v%d: acc %.4f, ppl %.3f", version.version, extra["llm_acc"],
                         extra["llm_ppl"])
            return extra

    def discard(self, request: RoundRequest) -> None:
        """The round failed: the LLM in memory goes back to the adapter it had before the round."""
        with self._lock:
            pending = self._pending
            if pending is not None and pending.submission_id == request.submission_id:
                self._pending = None
                self._restore(pending)
                log.info("submission %s failed: LLM restored to adapter v%d", request.submission_id, self._version)

    def _take_pending(self, request: RoundRequest) -> "_Pending":
        pending, self._pending = self._pending, None
        if pending is None or pending.submission_id != request.submission_id:
            raise PreconditionError(f"submission {request.submission_id!r} has no round waiting to be committed")
        return pending

    def _restore(self, pending: "_Pending") -> None:
        self.llm.load_adapter_state(pending.before)
        self._version = pending.version


@dataclass
class _Pending:
    """A round that ran but is not yet published: what restores the LLM, what commit needs."""

    submission_id: str
    before: dict
    version: int
    task: TaskSpec
    emit: Emit
    applied: bool = False
    metrics: dict = field(default_factory=dict)
