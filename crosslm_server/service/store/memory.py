"""The in-memory store: every record in dicts under one lock (tests, throw-away demos). It keeps
the `LeaseStore` contract too (one process's threads as the workers), so that contract's tests run
here as on PostgreSQL."""
from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from crosslm_shared.bundle import Manifest
from crosslm_shared.errors import AdapterConflictError, LeaseLostError
from crosslm_shared.records import Event, EventKind, Stage, Submission, Upload, Value
from crosslm_server.service.store.base import (AdapterRecord, Lease, LeaseStore, _check_complete, _check_same,
                                               _found)


@dataclass
class _Claim:
    worker: str
    token: int
    until: float


class MemoryStore(LeaseStore):
    """Everything in dicts under one lock: fast and forgetful."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._uploads: dict[str, Upload] = {}
        self._subs: dict[str, Submission] = {}
        self._by_upload: dict[str, str] = {}
        self._order: list[str] = []
        self._events: dict[str, list[Event]] = {}
        self._peers: dict[tuple[str, str], str] = {}
        self._claims: dict[str, _Claim] = {}  # running submission -> its lease
        self._attempts: dict[str, int] = {}
        self._adapters: dict[str, list[AdapterRecord]] = {}
        self._fence = 0

    def put_upload(self, upload: Upload) -> Upload:
        with self._lock:
            old = self._uploads.get(upload.upload_id)
            if old is None:
                self._uploads[upload.upload_id] = upload
                return upload
            _check_same(old, upload)
            return old

    def get_upload(self, upload_id: str) -> Upload:
        with self._lock:
            return _found(self._uploads.get(upload_id), "upload", upload_id)

    def mark_upload_complete(self, upload_id: str) -> Upload:
        with self._lock:
            up = replace(self.get_upload(upload_id), complete=True)
            self._uploads[upload_id] = up
            return up

    def delete_upload(self, upload_id: str) -> None:
        with self._lock:
            self._uploads.pop(upload_id, None)

    def submit(self, upload_id: str, *, submission_id: str, now: float) -> tuple[Submission, bool]:
        with self._lock:
            up = self.get_upload(upload_id)
            if upload_id in self._by_upload:
                return self._subs[self._by_upload[upload_id]], False
            _check_complete(up)
            sub = Submission(submission_id, upload_id, up.silo, up.manifest.task, Stage.QUEUED, now, now)
            self._subs[submission_id] = sub
            self._by_upload[upload_id] = submission_id
            self._order.append(submission_id)
            self._events[submission_id] = []
            return sub, True

    def get_submission(self, submission_id: str) -> Submission:
        with self._lock:
            return _found(self._subs.get(submission_id), "submission", submission_id)

    def list_submissions(self, *, silo: str | None = None) -> list[Submission]:
        with self._lock:
            subs = [self._subs[i] for i in self._order]
            return [s for s in subs if silo is None or s.silo == silo]

    def claim_next(self, *, now: float) -> Submission | None:
        with self._lock:
            for sid in self._order:
                if self._subs[sid].stage == Stage.QUEUED:
                    return self._update(sid, stage=Stage.RUNNING, updated_at=now)
            return None

    def requeue_running(self, *, now: float) -> list[str]:
        with self._lock:
            ids = [i for i in self._order if self._subs[i].stage == Stage.RUNNING]
            for sid in ids:
                self._requeue(sid, now)
            return ids

    def finish(self, submission_id: str, *, result: Manifest, metrics: Mapping[str, Value], now: float) -> Submission:
        with self._lock:
            sub = self.get_submission(submission_id)
            self._claims.pop(submission_id, None)
            done = self._update(submission_id, stage=Stage.READY, result=result, metrics=metrics, updated_at=now)
            self._peers[(sub.task, sub.silo)] = submission_id
            return done

    def fail(self, submission_id: str, *, error: str, now: float) -> Submission:
        with self._lock:
            self.get_submission(submission_id)
            self._claims.pop(submission_id, None)
            return self._update(submission_id, stage=Stage.FAILED, error=error, updated_at=now)

    def append_event(self, submission_id: str, kind: EventKind, fields: Mapping[str, Value], *,
                     now: float) -> Event:
        with self._lock:
            self.get_submission(submission_id)
            events = self._events[submission_id]
            event = Event(submission_id, len(events) + 1, kind, now, fields)
            events.append(event)
            return event

    def events_after(self, submission_id: str, after_seq: int) -> list[Event]:
        with self._lock:
            self.get_submission(submission_id)
            return [e for e in self._events[submission_id] if e.seq > after_seq]

    def queue_position(self, submission_id: str) -> int:
        with self._lock:
            queued = [i for i in self._order if self._subs[i].stage == Stage.QUEUED]
            return queued.index(submission_id) + 1 if submission_id in queued else 0

    def queued(self) -> list[str]:
        with self._lock:
            return [i for i in self._order if self._subs[i].stage == Stage.QUEUED]

    def queue_depth(self) -> int:
        with self._lock:
            return sum(1 for s in self._subs.values() if s.stage == Stage.QUEUED)

    def peers(self, task: str) -> dict[str, str]:
        with self._lock:
            return {silo: sid for (t, silo), sid in self._peers.items() if t == task}

    def pending_uploads(self, *, silo: str | None = None) -> list[Upload]:
        with self._lock:
            ups = sorted(self._uploads.values(), key=lambda u: u.created_at)
            return [u for u in ups if u.upload_id not in self._by_upload and (silo is None or u.silo == silo)]

    def queued_count(self, silo: str) -> int:
        with self._lock:
            return sum(1 for s in self._subs.values() if s.stage == Stage.QUEUED and s.silo == silo)

    def check_writable(self) -> None:
        return None

    # ---- leases (LeaseStore) ---------------------------------------------------------------
    def claim(self, *, worker: str, lease_s: float, now: float) -> Lease | None:
        with self._lock:
            busy = {s.task for s in self._subs.values() if s.stage == Stage.RUNNING}
            sid = next((i for i in self._order if self._subs[i].stage == Stage.QUEUED and self._subs[i].task not in busy),
                       None)
            if sid is None:
                return None
            self._fence += 1
            self._claims[sid] = _Claim(worker, self._fence, now + lease_s)
            self._attempts[sid] = self._attempts.get(sid, 0) + 1
            sub = self._update(sid, stage=Stage.RUNNING, updated_at=now)
            head = len(self._adapters.get(sub.task, []))
            return Lease(sub, worker, self._fence, now + lease_s, self._attempts[sid], head)

    def heartbeat(self, lease: Lease, *, lease_s: float, now: float) -> Lease:
        with self._lock:
            self._held(lease).until = now + lease_s
            return replace(lease, until=now + lease_s)

    def release(self, lease: Lease, *, now: float) -> bool:
        with self._lock:
            try:
                self._held(lease)
            except LeaseLostError:
                return False
            self._requeue(lease.submission.submission_id, now)
            return True

    def reap_expired(self, *, now: float, max_attempts: int) -> tuple[list[str], list[str]]:
        with self._lock:
            requeued, dead = [], []
            for sid in [i for i in self._order if i in self._claims and self._claims[i].until < now
                        and self._subs[i].stage == Stage.RUNNING]:
                if self._attempts[sid] >= max_attempts:
                    del self._claims[sid]
                    why = f"the round's worker was lost {self._attempts[sid]} times: dead-lettered, submit again"
                    self._update(sid, stage=Stage.FAILED, error=why, updated_at=now)
                    self.append_event(sid, EventKind.FAILED, {"reason": why}, now=now)
                    dead.append(sid)
                else:
                    self._requeue(sid, now)
                    self.append_event(sid, EventKind.QUEUED, {"position": self.queue_position(sid), "rerun": True},
                                      now=now)
                    requeued.append(sid)
            return requeued, dead

    def finish_leased(self, lease: Lease, *, result: Manifest, metrics: Mapping[str, Value], now: float,
                      adapter_uri: str | None, ready_fields: Mapping[str, Value]) -> tuple[Submission, Event]:
        with self._lock:
            self._held(lease)
            sub = lease.submission
            versions = self._adapters.setdefault(sub.task, [])
            if adapter_uri is not None:
                if len(versions) != lease.adapter_version:
                    raise AdapterConflictError(f"task {sub.task!r}: adapter version {lease.adapter_version + 1} was "
                                               "published by another round; the round runs again on the new version")
                versions.append(AdapterRecord(sub.task, len(versions) + 1, sub.submission_id, adapter_uri, now))
            done = self.finish(sub.submission_id, result=result, metrics=metrics, now=now)
            return done, self.append_event(sub.submission_id, EventKind.READY, ready_fields, now=now)

    def fail_leased(self, lease: Lease, *, error: str, now: float) -> tuple[Submission, Event]:
        with self._lock:
            self._held(lease)
            failed = self.fail(lease.submission.submission_id, error=error, now=now)
            return failed, self.append_event(lease.submission.submission_id, EventKind.FAILED, {"reason": error}, now=now)

    def adapter_versions(self, task: str) -> list[AdapterRecord]:
        with self._lock:
            return list(self._adapters.get(task, []))

    def _held(self, lease: Lease) -> _Claim:
        claim = self._claims.get(lease.submission.submission_id)
        if claim is None or claim.token != lease.token:
            raise LeaseLostError(f"submission {lease.submission.submission_id!r}: worker {lease.worker!r} lost its "
                                 f"lease (token {lease.token}); another worker runs the round, this result is "
                                 "thrown away")
        return claim

    def _requeue(self, submission_id: str, now: float) -> None:
        self._claims.pop(submission_id, None)
        self._update(submission_id, stage=Stage.QUEUED, updated_at=now)

    def _update(self, submission_id: str, **changes: Any) -> Submission:
        sub = replace(self._subs[submission_id], **changes)
        self._subs[submission_id] = sub
        return sub
