"""The durable state of the server behind one small interface (DESIGN.md §4).

`Store` states each operation's contract; `MemoryStore` (tests, throw-away demos) and
`SQLiteStore` (crosslm_server.store_sqlite, the default) implement it, and a PostgreSQL store
can later serve several workers. Bundle bytes live on disk, not here: the store holds
uploads, submissions with their stage, per-submission events with sequence numbers, and
which submission is each silo's latest accepted SLM per task.
"""
from __future__ import annotations

import abc
import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from crosslm_shared.bundle import Manifest
from crosslm_shared.errors import CrossLMError, NotFoundError, PermissionDeniedError, PreconditionError
from crosslm_shared.records import Event, Submission, Upload


class UploadConflictError(CrossLMError):
    """An upload id is reused with a different manifest (ALREADY_EXISTS)."""


def conflict_message(upload_id: str) -> str:
    return (f"upload id {upload_id!r} is already in use with a different manifest: "
            "choose a new upload id for a different bundle")


class Store(abc.ABC):
    """Uploads, the submission queue and its events. Thread-safe; times are unix seconds."""

    @abc.abstractmethod
    def put_upload(self, upload: Upload) -> Upload:
        """Record a new upload, or return the existing one with the same id.

        Raises PermissionDeniedError when the id belongs to another silo and
        UploadConflictError when it was registered with a different manifest.
        """

    @abc.abstractmethod
    def get_upload(self, upload_id: str) -> Upload:
        """The upload with this id; NotFoundError if there is none."""

    @abc.abstractmethod
    def mark_upload_complete(self, upload_id: str) -> Upload:
        """Flag that every file arrived and verified; idempotent."""

    @abc.abstractmethod
    def delete_upload(self, upload_id: str) -> None:
        """Forget an upload (after a rejected bundle); no error if it is absent."""

    @abc.abstractmethod
    def submit(self, upload_id: str, *, submission_id: str, now: float) -> tuple[Submission, bool]:
        """Queue a round for a complete upload; (submission, created).

        Idempotent per upload: a second call returns the first submission and False.
        A submission is not a peer yet: only `finish` (its round succeeded) makes it one.
        Raises NotFoundError for an unknown upload, PreconditionError for an incomplete one.
        """

    @abc.abstractmethod
    def get_submission(self, submission_id: str) -> Submission:
        """NotFoundError if absent."""

    @abc.abstractmethod
    def list_submissions(self, *, silo: str | None = None) -> list[Submission]:
        """Oldest first; only `silo`'s when given."""

    @abc.abstractmethod
    def claim_next(self, *, now: float) -> Submission | None:
        """Atomically move the oldest queued submission to running and return it."""

    @abc.abstractmethod
    def requeue_running(self, *, now: float) -> list[str]:
        """Put every running submission back in the queue (startup after a crash); their ids."""

    @abc.abstractmethod
    def finish(self, submission_id: str, *, result: Manifest, metrics: Mapping[str, str], now: float) -> Submission:
        """running -> ready with the enhanced bundle's manifest; the submission becomes its silo's
        latest accepted SLM for the task (a scorer of other silos' rounds, `peers`)."""

    @abc.abstractmethod
    def fail(self, submission_id: str, *, error: str, now: float) -> Submission:
        """running/queued -> failed with a reason."""

    @abc.abstractmethod
    def append_event(self, submission_id: str, kind: str, fields: Mapping[str, str], *, now: float) -> Event:
        """Append an event with the next sequence number (1, 2, ...) of that submission."""

    @abc.abstractmethod
    def events_after(self, submission_id: str, after_seq: int) -> list[Event]:
        """The submission's events with seq > after_seq, in order."""

    @abc.abstractmethod
    def queue_position(self, submission_id: str) -> int:
        """1 for the next to run among queued submissions; 0 when not queued."""

    @abc.abstractmethod
    def queued(self) -> list[str]:
        """Ids of queued submissions, the next to run first."""

    @abc.abstractmethod
    def queue_depth(self) -> int:
        """Number of queued submissions."""

    @abc.abstractmethod
    def peers(self, task: str) -> dict[str, str]:
        """silo -> submission id of that silo's latest SLM on `task` whose round succeeded."""

    @abc.abstractmethod
    def pending_uploads(self, *, silo: str | None = None) -> list[Upload]:
        """Uploads with no submission (partial, or complete and not submitted), oldest first;
        only `silo`'s when given. What a silo holds on disk outside the queue."""

    @abc.abstractmethod
    def queued_count(self, silo: str) -> int:
        """Number of `silo`'s submissions waiting in the queue (not running)."""

    @abc.abstractmethod
    def check_writable(self) -> None:
        """Raise PreconditionError unless a write would succeed now."""

    def close(self) -> None:
        """Release resources; the store is unusable afterwards."""


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
            sub = Submission(submission_id, upload_id, up.silo, up.manifest.task, "queued", now, now)
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
                if self._subs[sid].stage == "queued":
                    return self._update(sid, stage="running", updated_at=now)
            return None

    def requeue_running(self, *, now: float) -> list[str]:
        with self._lock:
            ids = [i for i in self._order if self._subs[i].stage == "running"]
            for sid in ids:
                self._update(sid, stage="queued", updated_at=now)
            return ids

    def finish(self, submission_id: str, *, result: Manifest, metrics: Mapping[str, str], now: float) -> Submission:
        with self._lock:
            sub = self.get_submission(submission_id)
            self._peers[(sub.task, sub.silo)] = submission_id
            return self._update(submission_id, stage="ready", result=result, metrics=dict(metrics), updated_at=now)

    def fail(self, submission_id: str, *, error: str, now: float) -> Submission:
        with self._lock:
            self.get_submission(submission_id)
            return self._update(submission_id, stage="failed", error=error, updated_at=now)

    def append_event(self, submission_id: str, kind: str, fields: Mapping[str, str], *, now: float) -> Event:
        with self._lock:
            self.get_submission(submission_id)
            events = self._events[submission_id]
            event = Event(submission_id, len(events) + 1, kind, now, dict(fields))
            events.append(event)
            return event

    def events_after(self, submission_id: str, after_seq: int) -> list[Event]:
        with self._lock:
            self.get_submission(submission_id)
            return [e for e in self._events[submission_id] if e.seq > after_seq]

    def queue_position(self, submission_id: str) -> int:
        with self._lock:
            queued = [i for i in self._order if self._subs[i].stage == "queued"]
            return queued.index(submission_id) + 1 if submission_id in queued else 0

    def queued(self) -> list[str]:
        with self._lock:
            return [i for i in self._order if self._subs[i].stage == "queued"]

    def queue_depth(self) -> int:
        with self._lock:
            return sum(1 for s in self._subs.values() if s.stage == "queued")

    def peers(self, task: str) -> dict[str, str]:
        with self._lock:
            return {silo: sid for (t, silo), sid in self._peers.items() if t == task}

    def pending_uploads(self, *, silo: str | None = None) -> list[Upload]:
        with self._lock:
            ups = sorted(self._uploads.values(), key=lambda u: u.created_at)
            return [u for u in ups if u.upload_id not in self._by_upload and (silo is None or u.silo == silo)]

    def queued_count(self, silo: str) -> int:
        with self._lock:
            return sum(1 for s in self._subs.values() if s.stage == "queued" and s.silo == silo)

    def check_writable(self) -> None:
        return None

    def _update(self, submission_id: str, **changes: Any) -> Submission:
        sub = replace(self._subs[submission_id], **changes)
        self._subs[submission_id] = sub
        return sub


def _found(value, what: str, key: str):
    if value is None:
        raise NotFoundError(f"no {what} with id {key!r}: check the id (ids are case-sensitive)")
    return value


def _check_same(old: Upload, new: Upload) -> None:
    if old.silo != new.silo:
        raise PermissionDeniedError(f"upload id {new.upload_id!r} belongs to another silo: choose a new upload id")
    if old.manifest != new.manifest:
        raise UploadConflictError(conflict_message(new.upload_id))


def _check_complete(up: Upload) -> None:
    if not up.complete:
        raise PreconditionError(f"upload {up.upload_id!r} is not complete: send the remaining "
                                "bytes (QueryUpload says how many are held) before Submit")
