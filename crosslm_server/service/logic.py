"""Service logic behind the gRPC servicer: uploads, submissions, events, downloads.

Works on frozen records only (the servicer converts protobuf at the edge). Files live in the
bundle storage (crosslm_server.service.storage; by default under the server's data directory):
    uploads/<upload_id>/<file>.part   bytes being received (fsynced every few MiB and at stream end)
    uploads/<upload_id>/<file>        a file whose SHA-256 matched
    bundles/<upload_id>/              a complete, validated bundle (renamed as one folder)
    results/<submission_id>/          the enhanced SLM, ready to download
    work/<submission_id>/             the engine's scratch folder (kept across a rerun)
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from crosslm_shared.bundle import Manifest, check_safetensors_prefix, validate_bundle_dir, validate_manifest
from crosslm_shared.errors import (BundleError, InvalidRequestError, NotFoundError, NotReadyError,
                                   PermissionDeniedError, PreconditionError, ResourceExhaustedError,
                                   StoppingError)
from crosslm_shared.records import TERMINAL_EVENTS, Event, EventKind, Stage, Submission, Upload, event_kind
from crosslm_shared.transfer import Chunk, OffsetError, PartialFile, committed_size, iter_chunks
from crosslm_server.engines.admission import IsolatedChecker, TaskLabels, check_task
from crosslm_server.service.config import Limits
from crosslm_server.service.metrics import Metrics
from crosslm_server.service.storage import BundleStorage, SharedDir
from crosslm_server.service.store import Store

log = logging.getLogger(__name__)
UPLOAD_ID_RE = re.compile(r"^[A-Za-z0-9._-]{8,128}$")


class CrossLMService:
    def __init__(self, store: Store, data_dir: Path, *, limits: Limits, metrics: Metrics,
                 clock: Callable[[], float] = time.time, storage: BundleStorage | None = None):
        self.store, self.data_dir, self.limits, self.metrics, self.clock = store, Path(data_dir), limits, metrics, clock
        self.storage = storage or SharedDir(self.data_dir)
        self._changed = threading.Condition()
        self._upload_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._partials: dict[str, dict[str, PartialFile]] = {}  # upload id -> file -> file being received
        self.wake_worker: Callable[[], None] = lambda: None
        # the engine's admission checks, set by the worker once the engine exists (`attach_checks`)
        self.task_labels: TaskLabels | None = None
        self.content_check: Callable[[Path, Manifest], object] | None = None
        self._checks_attached = threading.Event()
        self._checker: IsolatedChecker | None = None
        self._quota_lock = threading.Lock()
        self.stopping = threading.Event()

    def attach_checks(self, *, task_labels: TaskLabels | None,
                      content_check: Callable[[Path, Manifest], object] | None) -> None:
        """The engine's admission checks (see `crosslm_server.engines.admission`); None skips one. Uploads
        wait for this (up to `checks_wait_s`) so no bundle is taken before the checks exist."""
        self.task_labels, self.content_check = task_labels, content_check
        if content_check is not None:
            self._checker = IsolatedChecker(timeout_s=self.limits.admission_timeout_s,
                                            memory_bytes=self.limits.admission_memory_bytes)
            threading.Thread(target=self._checker.start, name="crosslm-admission-start", daemon=True).start()
        self._checks_attached.set()

    def close(self) -> None:
        """Stop what the service started beside the server (the content checker's process)."""
        if self._checker is not None:
            self._checker.close()

    def _wait_for_checks(self, checks_wait_s: float = 60.0) -> None:
        if not self._checks_attached.wait(checks_wait_s):
            raise NotReadyError("the server's engine is still starting, so uploads cannot be checked yet: "
                                "retry in a few seconds")

    # ---- paths -------------------------------------------------------------------------
    def bundle_dir(self, upload_id: str) -> Path:
        return self.storage.bundle_dir(upload_id)

    def result_dir(self, submission_id: str) -> Path:
        return self.storage.result_dir(submission_id)

    def work_dir(self, submission_id: str) -> Path:
        return self.storage.work_dir(submission_id)

    # ---- uploads -----------------------------------------------------------------------
    def committed(self, upload: Upload) -> dict[str, int]:
        if upload.complete:
            return {f.name: f.size for f in upload.manifest.files}
        folder = self.storage.upload_dir(upload.upload_id)
        return {f.name: committed_size(folder / f.name) for f in upload.manifest.files}

    def query_upload(self, silo: str, upload_id: str) -> tuple[Upload, dict[str, int]]:
        upload = self.store.get_upload(upload_id)
        _own(upload.silo, silo, "upload", upload_id)
        upload = self._settle(upload)
        return upload, self.committed(upload)

    def _settle(self, upload: Upload) -> Upload:
        """Finish the bookkeeping of an upload whose bundle was renamed into place just before a crash."""
        if not upload.complete and self.bundle_dir(upload.upload_id).is_dir():
            return self.store.mark_upload_complete(upload.upload_id)
        return upload

    def receive_upload(self, silo: str, upload_id: str, manifest: Manifest,
                       chunks: Iterable[Chunk]) -> tuple[Upload, dict[str, int]]:
        """Take an upload stream; returns what is held. Chunks after a complete upload are ignored.

        Contract: bytes are accepted only after the manifest validated; each file is renamed
        into place after its SHA-256 matched; a bad file or bundle discards the whole upload
        (nothing stays on disk) and raises; the same id can resume any number of times.
        """
        if not UPLOAD_ID_RE.match(upload_id):
            raise InvalidRequestError(f"upload_id={upload_id!r} is invalid: use 8-128 of [A-Za-z0-9._-]")
        if manifest.silo != silo:
            raise PermissionDeniedError(f"manifest.silo={manifest.silo!r} but you are silo {silo!r}: "
                                        "a silo uploads only its own SLM")
        validate_manifest(manifest, max_bundle_bytes=self.limits.max_bundle_bytes)
        self._wait_for_checks()
        check_task(manifest, self.task_labels)
        with self._quota_lock:  # the check and the new row together: two streams cannot both slip in
            self._check_upload_quota(silo, upload_id, manifest)
            upload = self._settle(self.store.put_upload(Upload(upload_id, silo, manifest, created_at=self.clock())))
        if upload.complete:
            return upload, self.committed(upload)
        lock = self._upload_lock(upload_id)
        if not lock.acquire(timeout=self.limits.upload_lock_timeout_s):
            raise PreconditionError(f"upload {upload_id!r} is being received on another stream; retry later")
        try:
            return self._receive_locked(upload, chunks)
        finally:
            lock.release()

    def _check_upload_quota(self, silo: str, upload_id: str, manifest: Manifest) -> None:
        """A new upload must fit the silo's share: pending uploads (rows in the store, folders on
        disk) and the bytes they reserve, partial ones included. Resuming a held upload is free."""
        try:
            self.store.get_upload(upload_id)
            return  # a held upload resumes (or is refused by put_upload): its share was counted
        except NotFoundError:
            pass
        pending, lim = self.store.pending_uploads(silo=silo), self.limits
        if len(pending) >= lim.max_pending_uploads_per_silo:
            raise ResourceExhaustedError(
                f"silo {silo!r} already holds {len(pending)} uploads that were not submitted (server "
                f"max_pending_uploads_per_silo={lim.max_pending_uploads_per_silo}): finish and submit one, or "
                f"wait until an abandoned one expires (upload_ttl_s={lim.upload_ttl_s:.0f})")
        held = sum(u.manifest.total_size for u in pending)
        if held + manifest.total_size > lim.max_silo_upload_bytes:
            raise ResourceExhaustedError(
                f"silo {silo!r} holds {held} bytes in uploads not yet submitted; {manifest.total_size} more "
                f"would pass the server's max_silo_upload_bytes={lim.max_silo_upload_bytes}: submit or let "
                f"abandoned uploads expire (upload_ttl_s={lim.upload_ttl_s:.0f}) first")

    def expire_uploads(self) -> list[str]:
        """Delete uploads never submitted whose files did not change for `upload_ttl_s`: their
        folder (partial or complete) and their store row. Returns their ids."""
        now, ttl = self.clock(), self.limits.upload_ttl_s
        expired = []
        for upload in self.store.pending_uploads():
            if upload.created_at > now - ttl:
                continue
            folders = [self.storage.upload_dir(upload.upload_id), self.bundle_dir(upload.upload_id)]
            if _last_change(folders) > now - ttl:
                continue  # still moving: a slow upload is not abandoned
            lock = self._upload_lock(upload.upload_id)
            if not lock.acquire(blocking=False):
                continue  # a stream is on it right now
            try:
                for folder in folders:
                    shutil.rmtree(folder, ignore_errors=True)
                self.store.delete_upload(upload.upload_id)
                self._partials.pop(upload.upload_id, None)
            finally:
                lock.release()
            with self._locks_guard:
                self._upload_locks.pop(upload.upload_id, None)
            expired.append(upload.upload_id)
            log.info("upload %s from silo %s: expired (no change for %.0f s), its files and record deleted",
                     upload.upload_id, upload.silo, ttl)
        return expired

    def _receive_locked(self, upload: Upload, chunks: Iterable[Chunk]) -> tuple[Upload, dict[str, int]]:
        folder = self.storage.upload_dir(upload.upload_id)
        folder.mkdir(parents=True, exist_ok=True)
        log.info("upload %s from silo %s: receiving (%d bytes in %d files)", upload.upload_id, upload.silo,
                 upload.manifest.total_size, len(upload.manifest.files))
        try:
            for chunk in chunks:  # protocol errors here refuse the stream but keep what is committed
                part = self._partial(upload, folder, chunk.file)
                before = part.committed
                part.write(chunk)
                self.metrics.bytes_in.inc(len(chunk.data))
                if chunk.file == "model.safetensors" and before < 8 <= part.committed:
                    self._verified(upload, folder, lambda: _check_safetensors_start(part))
                if part.done:
                    self._verified(upload, folder, part.finish)
                    self._partials.get(upload.upload_id, {}).pop(chunk.file, None)
        finally:  # the stream ended: what it wrote is made durable, file handles are released
            for part in self._partials.get(upload.upload_id, {}).values():
                part.close()
        if not all((folder / f.name).exists() or f.size == 0 for f in upload.manifest.files):
            return upload, self.committed(upload)
        for f in upload.manifest.files:
            if f.size == 0 and not (folder / f.name).exists():
                self._verified(upload, folder, PartialFile(folder / f.name, size=0, sha256=f.sha256).finish)
        self._verified(upload, folder, lambda: validate_bundle_dir(folder, upload.manifest))
        if self.content_check is not None:
            self._verified(upload, folder, lambda: self._checker(self.content_check, folder, upload.manifest))
        self._partials.pop(upload.upload_id, None)
        os.replace(folder, self.bundle_dir(upload.upload_id))
        upload = self.store.mark_upload_complete(upload.upload_id)
        self.metrics.uploads.labels("complete").inc()
        log.info("upload %s from silo %s: complete and verified", upload.upload_id, upload.silo)
        return upload, self.committed(upload)

    def _verified(self, upload: Upload, folder: Path, check: Callable[[], object]) -> None:
        """Run a check that proves the bundle bad when it fails: then nothing of the upload stays."""
        try:
            check()
        except BundleError:
            self._discard(upload, folder)
            raise

    def _partial(self, upload: Upload, folder: Path, name: str) -> PartialFile:
        files = self._partials.setdefault(upload.upload_id, {})
        if name not in files:
            entry = upload.manifest.file(name)
            if (folder / name).exists():
                raise OffsetError(f"file {name!r} of upload {upload.upload_id!r} is already complete; "
                                  "send only files whose committed size is below their size")
            files[name] = PartialFile(folder / name, size=entry.size, sha256=entry.sha256)
        return files[name]

    def _discard(self, upload: Upload, folder: Path) -> None:
        for part in self._partials.pop(upload.upload_id, {}).values():
            part.close()
        shutil.rmtree(folder, ignore_errors=True)
        self.store.delete_upload(upload.upload_id)
        self.metrics.uploads.labels("rejected").inc()
        log.warning("upload %s from silo %s: rejected, all its bytes discarded", upload.upload_id, upload.silo)

    def _upload_lock(self, upload_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._upload_locks.setdefault(upload_id, threading.Lock())

    # ---- submissions ---------------------------------------------------------------------
    def submit(self, silo: str, upload_id: str) -> Submission:
        upload = self.store.get_upload(upload_id)
        _own(upload.silo, silo, "upload", upload_id)
        if upload_id not in self._submitted_uploads(silo):
            self._check_queue_share(silo)
        sub, created = self.store.submit(upload_id, submission_id=f"sub-{uuid.uuid4().hex[:20]}", now=self.clock())
        if created:
            self.metrics.slm_accuracy.labels(silo, sub.task).set(upload.manifest.heldout_accuracy)
            self.emit(sub.submission_id, EventKind.QUEUED, {"position": self.store.queue_position(sub.submission_id)})
            self.metrics.queue_depth.set(self.store.queue_depth())
            log.info("submission %s of silo %s (upload %s): queued", sub.submission_id, silo, upload_id)
            self.wake_worker()
        return sub

    def _check_queue_share(self, silo: str) -> None:
        """Fair share of the queue: a silo may have `max_queued_per_silo` rounds waiting, and a full
        queue (`max_queue`) still takes a silo that has none waiting, so one silo's burst never
        blocks another silo's first submission."""
        mine, lim = self.store.queued_count(silo), self.limits
        if mine >= lim.max_queued_per_silo:
            raise ResourceExhaustedError(
                f"silo {silo!r} already has {mine} rounds waiting (server max_queued_per_silo="
                f"{lim.max_queued_per_silo}): wait for one to start, then retry")
        if mine and self.store.queue_depth() >= lim.max_queue:
            raise ResourceExhaustedError(f"the queue is full ({lim.max_queue} submissions waiting, server "
                                         "max_queue) and you have one waiting already: retry later")

    def _submitted_uploads(self, silo: str) -> set[str]:
        return {s.upload_id for s in self.store.list_submissions(silo=silo)}

    def get_submission(self, silo: str, submission_id: str) -> Submission:
        sub = self.store.get_submission(submission_id)
        _own(sub.silo, silo, "submission", submission_id)
        return sub

    def list_submissions(self, silo: str | None) -> list[Submission]:
        return self.store.list_submissions(silo=silo)

    def prune_rounds(self, silo: str) -> list[str]:
        """Keep the files of a silo's last `keep_rounds_per_silo` ended rounds; delete the older
        ones' result, work folder and uploaded bundle (the bundle of a submission that is a peer
        stays: other silos' rounds score with it). Rows stay, so the history can be listed.
        Returns the submission ids whose files were deleted."""
        ended = sorted((s for s in self.store.list_submissions(silo=silo) if s.terminal),
                       key=lambda s: (s.updated_at, s.submission_id), reverse=True)
        old = ended[self.limits.keep_rounds_per_silo:]
        if not old:
            return []
        peers = {sid for task in {s.task for s in old} for sid in self.store.peers(task).values()}
        pruned = []
        for sub in old:
            folders = [self.result_dir(sub.submission_id), self.work_dir(sub.submission_id)]
            if sub.submission_id not in peers:
                folders.append(self.bundle_dir(sub.upload_id))
            if any(f.exists() for f in folders):
                for folder in folders:
                    shutil.rmtree(folder, ignore_errors=True)
                pruned.append(sub.submission_id)
        if pruned:
            log.info("silo %s: deleted the files of %d old round(s) (keep_rounds_per_silo=%d)", silo, len(pruned),
                     self.limits.keep_rounds_per_silo)
        return pruned

    # ---- events --------------------------------------------------------------------------
    def emit(self, submission_id: str, kind: EventKind | str, fields: Mapping[str, Any]) -> Event:
        """Append an event (typed fields, crosslm_shared.records.typed_value) and wake the watchers;
        RecordValueError for a kind that is no EventKind or a field the wire cannot carry."""
        event = self.store.append_event(submission_id, event_kind(kind), fields, now=self.clock())
        self.notify_watchers()
        return event

    def notify_watchers(self) -> None:
        """Wake this process's Watch streams: the store holds new events (a worker in another
        process writes its own; the watchers see them at their next poll)."""
        with self._changed:
            self._changed.notify_all()

    def watch(self, silo: str, submission_id: str, after_seq: int, *,
              active: Callable[[], bool] = lambda: True, poll_s: float = 1.0) -> Iterator[Event]:
        """Events with seq > after_seq as they come; ends after the submission is ready or failed."""
        self.get_submission(silo, submission_id)
        while active():
            if self.stopping.is_set():
                raise StoppingError(f"the server is shutting down: reconnect and Watch {submission_id!r} "
                                    f"with after_seq={after_seq}")
            terminal = self.store.get_submission(submission_id).terminal
            events = self.store.events_after(submission_id, after_seq)
            for event in events:
                yield event
                after_seq = event.seq
            if terminal and not events:
                return
            if events and events[-1].kind in TERMINAL_EVENTS:
                return
            with self._changed:
                self._changed.wait(poll_s)

    def stop_watchers(self) -> None:
        self.stopping.set()
        with self._changed:
            self._changed.notify_all()

    # ---- downloads -----------------------------------------------------------------------
    def download(self, silo: str, submission_id: str, name: str, offset: int,
                 chunk_size: int = 0) -> Iterator[Chunk]:
        sub = self.get_submission(silo, submission_id)
        if sub.stage != Stage.READY or sub.result is None:
            raise PreconditionError(f"submission {submission_id!r} is {sub.stage}, not ready: "
                                    "Watch it until the 'ready' event, then download")
        entry = sub.result.file(name)
        if not self.result_dir(submission_id).is_dir():
            raise NotFoundError(f"the result of submission {submission_id!r} was deleted: the server keeps the "
                                f"files of each silo's last {self.limits.keep_rounds_per_silo} rounds "
                                "(keep_rounds_per_silo); submit again")
        if not 0 <= offset <= entry.size:
            raise InvalidRequestError(f"offset={offset} is outside file {name!r} of {entry.size} bytes")
        size = min(chunk_size or self.limits.chunk_size, self.limits.chunk_size)
        return iter_chunks(self.result_dir(submission_id) / name, name=name, offset=offset, chunk_size=size)


def _check_safetensors_start(part: PartialFile) -> None:
    with part.part.open("rb") as f:
        check_safetensors_prefix(f.read(8), part.size)


def _last_change(folders: Iterable[Path]) -> float:
    """The latest modification time of the folders or anything in them (0 when none exist)."""
    latest = 0.0
    for folder in folders:
        if folder.exists():
            latest = max([latest, folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.iterdir())])
    return latest


def _own(owner: str, caller: str, what: str, key: str) -> None:
    if owner != caller:
        raise PermissionDeniedError(f"{what} {key!r} belongs to another silo; you are {caller!r}")


__all__ = ["CrossLMService"]
