"""The durable state of the server behind one small interface (DESIGN.md §4).

`Store` states each operation's contract; `MemoryStore` (tests, throw-away demos) and
`SQLiteStore` (crosslm_server.service.store.sqlite, the default) implement it. `LeaseStore` adds
what several worker processes need (leases, fencing, one round per task, adapter versions);
`PostgresStore` (crosslm_server.service.store.postgres) implements both. Bundle bytes live on
disk, not here: the store holds uploads, submissions with their stage, per-submission events with
sequence numbers, and which submission is each silo's latest accepted SLM per task.
"""
from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass

from crosslm_shared.bundle import Manifest
from crosslm_shared.errors import NotFoundError, PermissionDeniedError, PreconditionError, UploadConflictError
from crosslm_shared.records import Event, EventKind, Submission, Upload, Value



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
    def finish(self, submission_id: str, *, result: Manifest, metrics: Mapping[str, Value], now: float) -> Submission:
        """running -> ready with the enhanced bundle's manifest and the round's metrics; the
        submission becomes its silo's latest accepted SLM for the task (a scorer of other silos'
        rounds, `peers`). Metrics are typed values (crosslm_shared.records.typed_value) and come
        back as they went in: a float with every bit, an int as an int, a list as a tuple of its
        type; RecordValueError (nothing stored) for a value that is none of those."""

    @abc.abstractmethod
    def fail(self, submission_id: str, *, error: str, now: float) -> Submission:
        """running/queued -> failed with a reason."""

    @abc.abstractmethod
    def append_event(self, submission_id: str, kind: EventKind, fields: Mapping[str, Value], *,
                     now: float) -> Event:
        """Append an event with the next sequence number (1, 2, ...) of that submission; its
        fields are typed values kept as `finish` keeps metrics."""

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


@dataclass(frozen=True)
class Lease:
    """A claimed round. `token` fences it: heartbeats, the finish and the failure of the round
    are accepted only while the submission still carries this token. `adapter_version` is the
    task's adapter version when the round was claimed: the round's update is computed on it, so it
    publishes version `adapter_version + 1` or nothing (compare-and-swap)."""

    submission: Submission
    worker: str
    token: int
    until: float
    attempt: int
    adapter_version: int


@dataclass(frozen=True)
class AdapterRecord:
    task: str
    version: int
    submission_id: str
    uri: str
    created_at: float


class LeaseStore(Store):
    """A store that several worker processes share (docs/service.md, "Production topology").

    Claims commit at once and hold no lock or transaction for the round; a round belongs to a
    worker only while its lease holds. At most one round of a task runs at a time (the database
    enforces it), and each task's adapter versions are 1, 2, 3 ... with one per finished round.
    """

    @abc.abstractmethod
    def claim(self, *, worker: str, lease_s: float, now: float) -> Lease | None:
        """Move the oldest queued submission whose task has no running round to running, with a
        new fencing token, `attempts + 1` and a lease until `now + lease_s`; None when there is none."""

    @abc.abstractmethod
    def heartbeat(self, lease: Lease, *, lease_s: float, now: float) -> Lease:
        """Extend the lease to `now + lease_s`; LeaseLostError when the token no longer holds it."""

    @abc.abstractmethod
    def release(self, lease: Lease, *, now: float) -> bool:
        """Give the round back to the queue (it runs again); False when the lease was lost already."""

    @abc.abstractmethod
    def reap_expired(self, *, now: float, max_attempts: int) -> tuple[list[str], list[str]]:
        """Running submissions whose lease ended before `now`: back to the queue with a `queued`
        event (rerun), or, after `max_attempts` claims, to the dead-letter state (`failed`, with a
        `failed` event saying so). Returns (requeued ids, dead-lettered ids)."""

    @abc.abstractmethod
    def finish_leased(self, lease: Lease, *, result: Manifest, metrics: Mapping[str, Value], now: float,
                      adapter_uri: str | None, ready_fields: Mapping[str, Value]) -> tuple[Submission, Event]:
        """In one transaction, only while `lease` holds: the submission becomes ready and a peer,
        its `ready` event is appended and, with `adapter_uri`, the task's adapter version
        `lease.adapter_version + 1` is published. LeaseLostError when the lease was lost,
        AdapterConflictError when that version exists already; then nothing changes."""

    @abc.abstractmethod
    def fail_leased(self, lease: Lease, *, error: str, now: float) -> tuple[Submission, Event]:
        """running -> failed with its `failed` event, only while `lease` holds (LeaseLostError)."""

    @abc.abstractmethod
    def adapter_versions(self, task: str) -> list[AdapterRecord]:
        """The task's published adapter versions, oldest first."""
