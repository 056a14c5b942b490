"""The in-memory store: every record in dicts under one lock (tests, throw-away demos)."""
from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from crosslm_shared.bundle import Manifest
from crosslm_shared.records import Event, EventKind, Stage, Submission, Upload, Value
from crosslm_server.service.store.base import Store, _check_complete, _check_same, _found


class MemoryStore(Store):
    """Everything in dicts under one lock: fast and forgetful."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._uploads: dict[str, Upload] = {}
        self._subs: dict[str, Submission] = {}
        self._by_upload: dict[str, str] = {}
        self._order: list[str] = []
        self._events: dict[str, list[Event]] = {}
        self._peers: dict[tuple[str, str], str] = {}

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
                self._update(sid, stage=Stage.QUEUED, updated_at=now)
            return ids

    def finish(self, submission_id: str, *, result: Manifest, metrics: Mapping[str, Value], now: float) -> Submission:
        with self._lock:
            sub = self.get_submission(submission_id)
            done = self._update(submission_id, stage=Stage.READY, result=result, metrics=metrics, updated_at=now)
            self._peers[(sub.task, sub.silo)] = submission_id
            return done

    def fail(self, submission_id: str, *, error: str, now: float) -> Submission:
        with self._lock:
            self.get_submission(submission_id)
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

    def _update(self, submission_id: str, **changes: Any) -> Submission:
        sub = replace(self._subs[submission_id], **changes)
        self._subs[submission_id] = sub
        return sub
