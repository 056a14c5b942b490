"""The worker: one thread that runs rounds one at a time, oldest first, off the gRPC threads.

With a `LeaseStore` shared by several workers (`lease` given: `crosslm-server worker`), each round
is claimed with a lease that a `LeaseKeeper` thread extends, and the round is published (ready
event, peer, adapter version) only while that lease holds: a worker that lost it throws its
result away (docs/service.md, "Production topology").

It loads the engine first (readiness stays false until the engine says ready), then claims
queued submissions from the store, calls `Engine.run_round`, turns the engine's progress
into events, and stores the enhanced SLM as a downloadable bundle. A round cut by a crash
is still `running` in the store; the server requeues it on start and it runs again (the
engine gets the same work_dir, so it can skip stages it already finished).
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from crosslm_shared.bundle import make_manifest, validate_bundle_dir
from crosslm_shared.errors import AdapterConflictError, CrossLMError, LeaseLostError
from crosslm_shared.records import EventKind, Submission, Value, typed_values
from crosslm_server.engines.api import Engine, RoundRequest
from crosslm_server.service.config import WorkerSection
from crosslm_server.service.leases import LeaseKeeper
from crosslm_server.service.logic import CrossLMService
from crosslm_server.service.store.base import Lease

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, service: CrossLMService, engine_factory: Callable[[], Engine], *, poll_s: float = 1.0,
                 nice: int = 0, lease: WorkerSection | None = None, name: str = "worker"):
        """`nice`: added to the worker thread's niceness (Linux: per thread), so the threads it
        starts (the engine's loader, torch's compute threads) inherit it and the gRPC and HTTP
        threads of the process get the CPU first when they need it. `lease`: claim rounds with
        leases of the store (a LeaseStore) under this worker's `name`; None: the one-process queue."""
        self.service, self.engine_factory, self.poll_s, self.nice = service, engine_factory, poll_s, nice
        self.lease, self.name = lease, name
        self.engine: Engine | None = None
        self.load_error: str = ""
        self.current: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crosslm-worker", daemon=True)
        service.wake_worker = self._wake.set

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Ask the loop to end after the current round; True if it ended within timeout."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def readiness(self) -> tuple[bool, str]:
        if self.load_error:
            return False, f"engine failed to load: {self.load_error}"
        if not self.running:
            return False, "worker is not running"
        if self.engine is not None and getattr(self.engine, "error", None):  # a load in the engine's own thread
            return False, f"engine failed to load: {self.engine.error}"
        if self.engine is None or not self.engine.ready():
            return False, "engine is loading"
        return True, "ready"

    # ---- loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        _lower_priority(self.nice)
        try:
            self.engine = self.engine_factory()
        except Exception as e:  # noqa: BLE001 - any load failure is reported on /readyz
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("engine failed to load")
            self.service.attach_checks(task_labels=None, content_check=None)  # no round will run anyway
            return
        self.service.attach_checks(task_labels=getattr(self.engine, "task_labels", None),
                                   content_check=getattr(self.engine, "check_slm", None))
        while not self._stop.is_set():
            if not self.engine.ready():
                self._stop.wait(0.1)
                continue
            try:
                sub, lease = self._claim()
                self.service.metrics.queue_depth.set(self.service.store.queue_depth())
            except Exception:  # noqa: BLE001 - a store hiccup must not end the worker; /readyz shows the store
                log.exception("worker could not claim work; retrying in %.1f s", self.poll_s)
                self._stop.wait(self.poll_s)
                continue
            if sub is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            self._announce_positions()
            self.run_one(sub, lease=lease)

    def _claim(self) -> tuple[Submission | None, Lease | None]:
        store, now = self.service.store, self.service.clock()
        if self.lease is None:
            return store.claim_next(now=now), None
        lease = store.claim(worker=self.name, lease_s=self.lease.lease_s, now=now)
        if lease is not None:
            log.info("worker %s: claimed submission %s (attempt %d, token %d, adapter v%d)", self.name,
                     lease.submission.submission_id, lease.attempt, lease.token, lease.adapter_version)
        return (lease.submission if lease else None), lease

    def _announce_positions(self) -> None:
        """The queue moved: tell every waiting submission its new position."""
        for position, waiting in enumerate(self.service.store.queued(), 1):
            self.service.emit(waiting, EventKind.QUEUED, {"position": position})

    def run_one(self, sub: Submission, *, lease: Lease | None = None) -> None:
        """One round. Success is one step at the end: the result is stored, then the engine
        publishes what the round changed (`commit`: the LLM adapter version), then the store
        marks the submission ready and makes it a peer. Any failure before that leaves no
        result, no adapter version and no change in the engine's memory (`discard`). With a
        lease, a lost lease ends the round quietly: the worker that took it over reports it."""
        svc, sid = self.service, sub.submission_id
        self.current = sid
        keeper = None if lease is None else LeaseKeeper(svc.store, lease, lease_s=self.lease.lease_s,
                                                         every_s=self.lease.heartbeat_s, clock=svc.clock).start()
        log.info("round for submission %s of silo %s on task %s: started", sid, sub.silo, sub.task)
        svc.emit(sid, EventKind.STARTED, {} if lease is None else {"attempt": lease.attempt})
        timer = _StageTimer(svc.metrics)
        request = None
        try:
            request = self._request(sub)
            outcome = self.engine.run_round(request, lambda kind, fields: self._emit(sid, kind, fields, timer, keeper))
            timer.close()
            if keeper is not None:
                keeper.renew()  # the result folder is written only while this worker holds the round
            result = self._store_result(sub, Path(outcome.slm_dir))
            metrics = dict(typed_values(outcome.metrics))  # a metric the wire cannot carry fails before commit
            commit = getattr(self.engine, "commit", None)
            if commit is not None:
                metrics |= dict(commit(request, outcome) or {})
            adapter_uri = metrics.pop("adapter_uri", None)  # a server location: never shown to a silo
            metrics = dict(typed_values(metrics))
            self._outcome_metrics(metrics, kept_seen=timer.kept_seen, task=sub.task)
            self._publish(sub, lease, result, metrics, adapter_uri)
            svc.metrics.rounds.labels("done").inc()
            log.info("round for submission %s of silo %s: ready", sid, sub.silo)
        except (LeaseLostError, AdapterConflictError) as e:
            log.warning("round for submission %s of silo %s: not published: %s", sid, sub.silo, e)
            self._discard(sub, request)
            if isinstance(e, AdapterConflictError):
                self._release(lease)
        except Exception as e:  # noqa: BLE001 - a failed round is reported, the worker goes on
            if isinstance(e, CrossLMError):  # a reason written for the caller: one line is enough
                log.warning("round for submission %s of silo %s: failed: %s: %s", sid, sub.silo, type(e).__name__, e)
            else:
                log.exception("round for submission %s of silo %s: failed", sid, sub.silo)
            self._undo(sub, request)
            self._fail(sub, lease, public_reason(e))
        finally:
            self.current = None
            if keeper is not None:
                keeper.stop()
        try:
            svc.prune_rounds(sub.silo)
        except Exception:  # noqa: BLE001 - logged; the next round of the silo tries again
            log.exception("deleting old rounds of silo %s failed", sub.silo)

    def _publish(self, sub: Submission, lease: Lease | None, result, metrics: Mapping[str, Value],
                 adapter_uri: str | None) -> None:
        svc, sid = self.service, sub.submission_id
        ready = {"files": len(result.files), "bytes": result.total_size}
        if lease is None:
            svc.store.finish(sid, result=result, metrics=metrics, now=svc.clock())
            svc.emit(sid, EventKind.READY, ready)
            return
        svc.store.finish_leased(lease, result=result, metrics=metrics, now=svc.clock(), adapter_uri=adapter_uri,
                                ready_fields=ready)
        svc.notify_watchers()

    def _release(self, lease: Lease) -> None:
        try:
            self.service.store.release(lease, now=self.service.clock())
        except Exception:  # noqa: BLE001 - the store is away: the lease ends and the round runs again
            log.exception("round for submission %s: could not give it back; it runs again once its lease ends",
                          lease.submission.submission_id)

    def _fail(self, sub: Submission, lease: Lease | None, reason: str) -> None:
        svc, sid = self.service, sub.submission_id
        if lease is None:
            svc.store.fail(sid, error=reason, now=svc.clock())
            svc.emit(sid, EventKind.FAILED, {"reason": reason})
        else:
            try:
                svc.store.fail_leased(lease, error=reason, now=svc.clock())
            except LeaseLostError as e:
                log.warning("round for submission %s: failure not recorded: %s", sid, e)
                return
            except Exception:  # noqa: BLE001 - the store is away: the lease ends and the round runs again
                log.exception("round for submission %s: failure not recorded; it runs again once its lease ends", sid)
                return
            svc.notify_watchers()
        svc.metrics.rounds.labels("failed").inc()

    def _undo(self, sub: Submission, request: RoundRequest | None) -> None:
        """A failed round leaves nothing: no result folder, no change in the engine's memory."""
        shutil.rmtree(self.service.result_dir(sub.submission_id), ignore_errors=True)
        self._discard(sub, request)

    def _discard(self, sub: Submission, request: RoundRequest | None) -> None:
        """Undo the round in the engine's memory (its files may be another worker's by now)."""
        discard = getattr(self.engine, "discard", None)
        if discard is not None and request is not None:
            try:
                discard(request)
            except Exception:  # noqa: BLE001 - logged; the engine reports itself through readiness
                log.exception("round for submission %s: the engine could not undo it", sub.submission_id)

    def _request(self, sub: Submission) -> RoundRequest:
        svc = self.service
        slm_dir = svc.bundle_dir(sub.upload_id)
        peers = {silo: svc.bundle_dir(svc.store.get_submission(peer).upload_id)
                 for silo, peer in svc.store.peers(sub.task).items()}
        peers[sub.silo] = slm_dir
        work = svc.work_dir(sub.submission_id)
        work.mkdir(parents=True, exist_ok=True)
        return RoundRequest(sub.submission_id, sub.silo, sub.task, slm_dir, peers, work)

    def _emit(self, sid: str, kind: str, fields: Mapping[str, Any], timer: "_StageTimer",
              keeper: LeaseKeeper | None) -> None:
        if keeper is not None:
            keeper.check()  # a round whose lease was lost stops at its next step
        timer.enter(kind)
        metrics = self.service.metrics
        if _number(fields.get("tokens_per_s")) is not None:
            metrics.tokens_per_s.set(_number(fields["tokens_per_s"]))
        if _number(fields.get("kept")) is not None:
            metrics.samples_kept.inc(_number(fields["kept"]))
            timer.kept_seen = True
        self.service.emit(sid, kind, fields)

    def _outcome_metrics(self, metrics: Mapping[str, Any], *, kept_seen: bool, task: str) -> None:
        """Figures an engine reports only at the end of the round (unless an event carried them)."""
        m = self.service.metrics
        if _number(metrics.get("tokens_per_s")) is not None:
            m.tokens_per_s.set(_number(metrics["tokens_per_s"]))
        if not kept_seen and _number(metrics.get("kept")) is not None:
            m.samples_kept.inc(_number(metrics["kept"]))
        for key, gauge in (("llm_acc", m.llm_accuracy), ("llm_ppl", m.llm_perplexity)):
            if _number(metrics.get(key)) is not None:
                gauge.labels(task).set(_number(metrics[key]))

    def _store_result(self, sub: Submission, slm_dir: Path):
        """Validate the engine's folder as a bundle and move a copy into results/ atomically."""
        svc = self.service
        upload = svc.store.get_upload(sub.upload_id)
        sent = upload.manifest
        temperature = sent.temperature
        meta = slm_dir / "crosslm.json"
        if meta.exists():
            temperature = float(json.loads(meta.read_text()).get("temperature", temperature))
        manifest = make_manifest(slm_dir, task=sent.task, silo=sent.silo, arch=sent.arch, labels=sent.labels,
                                 temperature=temperature, heldout_accuracy=0.0, result=True)
        validate_bundle_dir(slm_dir, manifest)
        final = svc.result_dir(sub.submission_id)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for entry in manifest.files:
            shutil.copyfile(slm_dir / entry.name, tmp / entry.name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return manifest


class _StageTimer:
    """Observes how long each emitted stage lasted (until the next emit or the end)."""

    def __init__(self, metrics) -> None:
        self.metrics, self.stage, self.since = metrics, None, time.monotonic()
        self.kept_seen = False

    def enter(self, stage: str) -> None:
        if stage != self.stage:
            self.close()
            self.stage, self.since = stage, time.monotonic()

    def close(self) -> None:
        if self.stage is not None:
            self.metrics.stage_seconds.labels(self.stage).observe(time.monotonic() - self.since)
            self.stage = None


_PATH_RE = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^\s'\"/\\:,;()\[\]]+)+[/\\]?")


def public_reason(error: BaseException) -> str:
    """What a silo is told about its failed round: the problem, never a server path or a
    traceback (the full text is in the server's log). CrossLM's own errors are written for the
    caller and keep their words with paths cut to their last part; any other error (a library's
    text) is named by its type only."""
    if isinstance(error, CrossLMError):
        text = _PATH_RE.sub(lambda m: Path(m.group(0).rstrip("/\\")).name or "/", str(error))
        return f"{type(error).__name__}: {text}"[:500]
    return (f"the round failed inside the engine ({type(error).__name__}); the server's operator has the "
            "details in its log")


def _number(value: Any) -> float | None:
    """A finite number from an engine's field or metric, or None (absent, not a number, NaN)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value) if math.isfinite(value) else None


def _lower_priority(nice: int) -> None:
    """Add `nice` to this thread's niceness; threads it creates later inherit it (Linux only:
    elsewhere setpriority would renice the whole process, gRPC and HTTP threads included)."""
    if nice <= 0 or sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as e:
        log.warning("worker: could not lower its priority by %d (%s); rounds compete with requests", nice, e)
