"""SQLite implementation of `Store`: WAL mode, named parameters, claims in BEGIN IMMEDIATE.

One connection guarded by a lock serves the process (grpc threads, the worker, HTTP);
`:memory:` works for tests. Manifests are stored as JSON text via crosslm_shared.convert; metrics
and event fields as JSON objects of their typed values (json keeps a float's every bit, tells an
int from a float and writes NaN and infinities as Python reads them back). Rows written before
typed values hold JSON objects of strings: they read back as those strings. A stage is stored as
its `Stage` value.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from crosslm_shared.bundle import Manifest
from crosslm_shared.convert import manifest_from_json, manifest_to_json
from crosslm_shared.errors import PreconditionError
from crosslm_shared.records import Event, EventKind, Submission, Upload, Value, typed_values
from crosslm_server.service.store.base import Store, _check_complete, _check_same, _found

PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=5000",
    "PRAGMA foreign_keys=ON",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    upload_id  TEXT PRIMARY KEY,
    silo       TEXT NOT NULL,
    manifest   TEXT NOT NULL,
    complete   INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS submissions (
    n             INTEGER PRIMARY KEY AUTOINCREMENT,
    submission_id TEXT NOT NULL UNIQUE,
    upload_id     TEXT NOT NULL UNIQUE,
    silo          TEXT NOT NULL,
    task          TEXT NOT NULL,
    stage         TEXT NOT NULL,
    error         TEXT NOT NULL DEFAULT '',
    result        TEXT,
    metrics       TEXT NOT NULL DEFAULT '{}',
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS submissions_stage ON submissions (stage, n);
CREATE TABLE IF NOT EXISTS events (
    submission_id TEXT NOT NULL REFERENCES submissions (submission_id),
    seq           INTEGER NOT NULL,
    kind          TEXT NOT NULL,
    time          REAL NOT NULL,
    fields        TEXT NOT NULL,
    PRIMARY KEY (submission_id, seq)
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS peers (
    task          TEXT NOT NULL,
    silo          TEXT NOT NULL,
    submission_id TEXT NOT NULL REFERENCES submissions (submission_id),
    PRIMARY KEY (task, silo)
);
"""

_SUB_COLUMNS = "submission_id, upload_id, silo, task, stage, created_at, updated_at, error, result, metrics"


class SQLiteStore(Store):
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for pragma in PRAGMAS:
            self._db.execute(pragma)
        self._db.executescript(SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken with BEGIN IMMEDIATE so claims never race."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, params: Mapping) -> tuple | None:
        with self._lock:
            return self._db.execute(sql, params).fetchone()

    def put_upload(self, upload: Upload) -> Upload:
        with self._tx() as db:
            row = db.execute("SELECT upload_id, silo, manifest, complete, created_at FROM uploads "
                             "WHERE upload_id = :id", {"id": upload.upload_id}).fetchone()
            if row is not None:
                old = _upload(row)
                _check_same(old, upload)
                return old
            db.execute("INSERT INTO uploads (upload_id, silo, manifest, complete, created_at) "
                       "VALUES (:id, :silo, :manifest, :complete, :created_at)",
                       {"id": upload.upload_id, "silo": upload.silo, "manifest": manifest_to_json(upload.manifest),
                        "complete": int(upload.complete), "created_at": upload.created_at})
            return upload

    def get_upload(self, upload_id: str) -> Upload:
        row = self._one("SELECT upload_id, silo, manifest, complete, created_at FROM uploads "
                        "WHERE upload_id = :id", {"id": upload_id})
        return _upload(_found(row, "upload", upload_id))

    def mark_upload_complete(self, upload_id: str) -> Upload:
        with self._tx() as db:
            db.execute("UPDATE uploads SET complete = 1 WHERE upload_id = :id", {"id": upload_id})
        return self.get_upload(upload_id)

    def delete_upload(self, upload_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM uploads WHERE upload_id = :id", {"id": upload_id})

    def submit(self, upload_id: str, *, submission_id: str, now: float) -> tuple[Submission, bool]:
        with self._tx() as db:
            up = self.get_upload(upload_id)
            row = db.execute(f"SELECT {_SUB_COLUMNS} FROM submissions WHERE upload_id = :id",
                             {"id": upload_id}).fetchone()
            if row is not None:
                return _submission(row), False
            _check_complete(up)
            params = {"sid": submission_id, "uid": upload_id, "silo": up.silo,
                      "task": up.manifest.task, "now": now}
            db.execute("INSERT INTO submissions (submission_id, upload_id, silo, task, stage, created_at, "
                       "updated_at) VALUES (:sid, :uid, :silo, :task, 'queued', :now, :now)", params)
        return self.get_submission(submission_id), True

    def get_submission(self, submission_id: str) -> Submission:
        row = self._one(f"SELECT {_SUB_COLUMNS} FROM submissions WHERE submission_id = :id",
                        {"id": submission_id})
        return _submission(_found(row, "submission", submission_id))

    def list_submissions(self, *, silo: str | None = None) -> list[Submission]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_SUB_COLUMNS} FROM submissions "
                                    "WHERE :silo IS NULL OR silo = :silo ORDER BY n", {"silo": silo}).fetchall()
        return [_submission(r) for r in rows]

    def claim_next(self, *, now: float) -> Submission | None:
        with self._tx() as db:
            row = db.execute("SELECT submission_id FROM submissions WHERE stage = 'queued' "
                             "ORDER BY n LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE submissions SET stage = 'running', updated_at = :now "
                       "WHERE submission_id = :id", {"id": row[0], "now": now})
        return self.get_submission(row[0])

    def requeue_running(self, *, now: float) -> list[str]:
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT submission_id FROM submissions "
                                            "WHERE stage = 'running' ORDER BY n")]
            db.execute("UPDATE submissions SET stage = 'queued', updated_at = :now "
                       "WHERE stage = 'running'", {"now": now})
        return ids

    def finish(self, submission_id: str, *, result: Manifest, metrics: Mapping[str, Value], now: float) -> Submission:
        sub = self.get_submission(submission_id)
        metrics = typed_values(metrics)
        with self._tx() as db:  # ready and a peer in one transaction
            db.execute("UPDATE submissions SET stage = 'ready', result = :result, metrics = :metrics, "
                       "updated_at = :now WHERE submission_id = :id",
                       {"id": submission_id, "result": manifest_to_json(result),
                        "metrics": json.dumps(dict(metrics)), "now": now})
            db.execute("INSERT INTO peers (task, silo, submission_id) VALUES (:task, :silo, :id) "
                       "ON CONFLICT (task, silo) DO UPDATE SET submission_id = excluded.submission_id",
                       {"task": sub.task, "silo": sub.silo, "id": submission_id})
        return self.get_submission(submission_id)

    def fail(self, submission_id: str, *, error: str, now: float) -> Submission:
        self.get_submission(submission_id)
        with self._tx() as db:
            db.execute("UPDATE submissions SET stage = 'failed', error = :error, updated_at = :now "
                       "WHERE submission_id = :id", {"id": submission_id, "error": error, "now": now})
        return self.get_submission(submission_id)

    def append_event(self, submission_id: str, kind: EventKind, fields: Mapping[str, Value], *,
                     now: float) -> Event:
        self.get_submission(submission_id)
        with self._tx() as db:
            (last,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE submission_id = :id",
                                 {"id": submission_id}).fetchone()
            event = Event(submission_id, last + 1, kind, now, fields)
            db.execute("INSERT INTO events (submission_id, seq, kind, time, fields) "
                       "VALUES (:id, :seq, :kind, :time, :fields)",
                       {"id": submission_id, "seq": event.seq, "kind": event.kind, "time": now,
                        "fields": json.dumps(dict(event.fields))})
        return event

    def events_after(self, submission_id: str, after_seq: int) -> list[Event]:
        self.get_submission(submission_id)
        with self._lock:
            rows = self._db.execute("SELECT submission_id, seq, kind, time, fields FROM events "
                                    "WHERE submission_id = :id AND seq > :after ORDER BY seq",
                                    {"id": submission_id, "after": after_seq}).fetchall()
        return [Event(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]

    def queue_position(self, submission_id: str) -> int:
        row = self._one("SELECT COUNT(*) FROM submissions q, submissions s WHERE s.submission_id = :id "
                        "AND s.stage = 'queued' AND q.stage = 'queued' AND q.n <= s.n", {"id": submission_id})
        return row[0] if row else 0

    def queued(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT submission_id FROM submissions WHERE stage = 'queued' ORDER BY n").fetchall()
        return [r[0] for r in rows]

    def queue_depth(self) -> int:
        return self._one("SELECT COUNT(*) FROM submissions WHERE stage = 'queued'", {})[0]

    def peers(self, task: str) -> dict[str, str]:
        with self._lock:
            rows = self._db.execute("SELECT silo, submission_id FROM peers WHERE task = :task "
                                    "ORDER BY silo", {"task": task}).fetchall()
        return dict(rows)

    def pending_uploads(self, *, silo: str | None = None) -> list[Upload]:
        with self._lock:
            rows = self._db.execute("SELECT u.upload_id, u.silo, u.manifest, u.complete, u.created_at FROM uploads u "
                                    "LEFT JOIN submissions s ON s.upload_id = u.upload_id "
                                    "WHERE s.upload_id IS NULL AND (:silo IS NULL OR u.silo = :silo) "
                                    "ORDER BY u.created_at", {"silo": silo}).fetchall()
        return [_upload(r) for r in rows]

    def queued_count(self, silo: str) -> int:
        return self._one("SELECT COUNT(*) FROM submissions WHERE stage = 'queued' AND silo = :silo",
                         {"silo": silo})[0]

    def check_writable(self) -> None:
        try:
            with self._tx() as db:
                db.execute("INSERT INTO meta (key, value) VALUES ('write_probe', :now) "
                           "ON CONFLICT (key) DO UPDATE SET value = excluded.value", {"now": repr(time.time())})
        except sqlite3.Error as e:
            raise PreconditionError(f"store {self.path!r} is not writable: {e}") from e

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _upload(row: tuple) -> Upload:
    return Upload(upload_id=row[0], silo=row[1], manifest=manifest_from_json(row[2]),
                  complete=bool(row[3]), created_at=row[4])


def _submission(row: tuple) -> Submission:
    return Submission(submission_id=row[0], upload_id=row[1], silo=row[2], task=row[3], stage=row[4],
                      created_at=row[5], updated_at=row[6], error=row[7],
                      result=manifest_from_json(row[8]) if row[8] else None,
                      metrics=json.loads(row[9]))
