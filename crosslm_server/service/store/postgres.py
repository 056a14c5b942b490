"""PostgreSQL implementation of `Store` and `LeaseStore`: the shared state of several front-ends
and workers (docs/service.md, "Production topology").

psycopg 3 with a connection pool; named parameters only; every operation is one short
transaction (a claim commits at once, no lock is held for a round). The schema is versioned
(migrations/NNNN_*.sql, table `schema_migrations`) and brought up to date when the store opens, under an
advisory lock so that processes starting together apply each migration once. One running round
per task is a partial unique index, not only a rule in the code.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from crosslm_shared.bundle import Manifest
from crosslm_shared.convert import manifest_from_json, manifest_to_json
from crosslm_shared.errors import (AdapterConflictError, ConfigError, LeaseLostError, PreconditionError)
from crosslm_shared.records import Event, EventKind, Submission, Upload, Value, typed_values
from crosslm_server.service.store.base import (AdapterRecord, Lease, LeaseStore, _check_complete, _check_same,
                                               _found)

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg.conninfo import conninfo_to_dict
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError:  # the `postgres` extra is not installed: the store says so when asked for
    psycopg = None

log = logging.getLogger(__name__)
MIGRATION_LOCK = 0x43524C4D  # "CRLM": pg_advisory_xact_lock key for applying migrations

MIGRATIONS_DIR = Path(__file__).with_name("migrations")  # NNNN_name.sql, applied in order, each once


def migrations() -> list[tuple[int, str]]:
    """(version, SQL) of every migration file, oldest first."""
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        found.append((int(path.name[:4]), path.read_text()))
    return found


_SUB = "submission_id, upload_id, silo, task, stage, created_at, updated_at, error, result, metrics"
_UPLOAD = "upload_id, silo, manifest, complete, created_at"
_CLAIM = f"""
WITH next AS (
    SELECT q.n FROM submissions q
    WHERE q.stage = 'queued'
      AND NOT EXISTS (SELECT 1 FROM submissions r WHERE r.task = q.task AND r.stage = 'running')
    ORDER BY q.n FOR UPDATE SKIP LOCKED LIMIT 1)
UPDATE submissions s SET stage = 'running', worker = %(worker)s, lease_until = %(until)s,
       attempts = s.attempts + 1, token = nextval('fence'), updated_at = %(now)s
FROM next WHERE s.n = next.n
RETURNING {', '.join('s.' + c for c in _SUB.split(', '))}, s.token, s.attempts"""


class PostgresStore(LeaseStore):
    def __init__(self, dsn: str, *, pool_size: int = 8, connect_timeout_s: float = 10.0) -> None:
        if psycopg is None:
            raise ConfigError("[store] kind='postgres' needs psycopg 3 and psycopg-pool: "
                              "pip install 'crosslm[postgres]'")
        if not dsn:
            raise ConfigError("[store] dsn is empty: give a libpq connection string, e.g. "
                              "'postgresql://crosslm@db:5432/crosslm' (the password in PGPASSWORD or ~/.pgpass)")
        self.dsn = dsn
        self._pool = ConnectionPool(dsn, min_size=1, max_size=pool_size, timeout=connect_timeout_s, open=False,
                                    name="crosslm-store")
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except PoolTimeout as e:
            self._pool.close()
            raise PreconditionError(f"[store] dsn: no PostgreSQL answered within {connect_timeout_s:.0f} s "
                                    f"({_safe(dsn)}): start it or fix the dsn") from e
        try:
            self.migrate()
        except BaseException:
            self._pool.close()
            raise

    # ---- plumbing --------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator["psycopg.Cursor"]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        with self._pool.connection() as conn:
            with conn.cursor() as cur:
                yield cur

    def _one(self, sql: str, params: Mapping) -> tuple | None:
        with self._tx() as cur:
            return cur.execute(sql, params).fetchone()

    def _all(self, sql: str, params: Mapping) -> list[tuple]:
        with self._tx() as cur:
            return cur.execute(sql, params).fetchall()

    def migrate(self) -> int:
        """Apply the migrations this database lacks, each once; returns the schema version."""
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%(key)s)", {"key": MIGRATION_LOCK})
            cur.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                        "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            done = {r[0] for r in cur.execute("SELECT version FROM schema_migrations").fetchall()}
            known = migrations()
            newer = sorted(done - {v for v, _ in known})
            if newer:
                raise PreconditionError(f"the database holds schema version(s) {newer} that this CrossLM does not "
                                        "know: upgrade CrossLM (never run an older one against a migrated database)")
            for version, sql in known:
                if version not in done:
                    cur.execute(sql)
                    cur.execute("INSERT INTO schema_migrations (version) VALUES (%(v)s)", {"v": version})
                    log.info("store: applied schema migration %d", version)
        return max(v for v, _ in known)

    # ---- uploads ---------------------------------------------------------------------------
    def put_upload(self, upload: Upload) -> Upload:
        with self._tx() as cur:
            cur.execute("INSERT INTO uploads (upload_id, silo, manifest, complete, created_at) "
                        "VALUES (%(id)s, %(silo)s, %(manifest)s, %(complete)s, %(created_at)s) "
                        "ON CONFLICT (upload_id) DO NOTHING",
                        {"id": upload.upload_id, "silo": upload.silo, "manifest": manifest_to_json(upload.manifest),
                         "complete": upload.complete, "created_at": upload.created_at})
            if cur.rowcount == 1:
                return upload
            row = cur.execute(f"SELECT {_UPLOAD} FROM uploads WHERE upload_id = %(id)s",
                              {"id": upload.upload_id}).fetchone()
        old = _upload(row)
        _check_same(old, upload)
        return old

    def get_upload(self, upload_id: str) -> Upload:
        row = self._one(f"SELECT {_UPLOAD} FROM uploads WHERE upload_id = %(id)s", {"id": upload_id})
        return _upload(_found(row, "upload", upload_id))

    def mark_upload_complete(self, upload_id: str) -> Upload:
        row = self._one(f"UPDATE uploads SET complete = true WHERE upload_id = %(id)s RETURNING {_UPLOAD}",
                        {"id": upload_id})
        return _upload(_found(row, "upload", upload_id))

    def delete_upload(self, upload_id: str) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM uploads WHERE upload_id = %(id)s", {"id": upload_id})

    def pending_uploads(self, *, silo: str | None = None) -> list[Upload]:
        rows = self._all("SELECT u.upload_id, u.silo, u.manifest, u.complete, u.created_at FROM uploads u "
                         "LEFT JOIN submissions s ON s.upload_id = u.upload_id WHERE s.upload_id IS NULL "
                         "AND (%(silo)s::text IS NULL OR u.silo = %(silo)s) ORDER BY u.created_at, u.upload_id",
                         {"silo": silo})
        return [_upload(r) for r in rows]

    # ---- submissions -----------------------------------------------------------------------
    def submit(self, upload_id: str, *, submission_id: str, now: float) -> tuple[Submission, bool]:
        with self._tx() as cur:
            row = cur.execute(f"SELECT {_UPLOAD} FROM uploads WHERE upload_id = %(id)s FOR UPDATE",
                              {"id": upload_id}).fetchone()
            up = _upload(_found(row, "upload", upload_id))
            row = cur.execute(f"SELECT {_SUB} FROM submissions WHERE upload_id = %(id)s", {"id": upload_id}).fetchone()
            if row is not None:
                return _submission(row), False
            _check_complete(up)
            row = cur.execute(f"INSERT INTO submissions (submission_id, upload_id, silo, task, stage, created_at, "
                              "updated_at) VALUES (%(sid)s, %(uid)s, %(silo)s, %(task)s, 'queued', %(now)s, %(now)s) "
                              f"RETURNING {_SUB}", {"sid": submission_id, "uid": upload_id, "silo": up.silo,
                                                    "task": up.manifest.task, "now": now}).fetchone()
        return _submission(row), True

    def get_submission(self, submission_id: str) -> Submission:
        row = self._one(f"SELECT {_SUB} FROM submissions WHERE submission_id = %(id)s", {"id": submission_id})
        return _submission(_found(row, "submission", submission_id))

    def list_submissions(self, *, silo: str | None = None) -> list[Submission]:
        rows = self._all(f"SELECT {_SUB} FROM submissions WHERE %(silo)s::text IS NULL OR silo = %(silo)s "
                         "ORDER BY n", {"silo": silo})
        return [_submission(r) for r in rows]

    def claim_next(self, *, now: float) -> Submission | None:
        lease = self.claim(worker="", lease_s=float("inf"), now=now)
        return None if lease is None else lease.submission

    def requeue_running(self, *, now: float) -> list[str]:
        rows = self._all("UPDATE submissions SET stage = 'queued', worker = '', lease_until = NULL, "
                         "updated_at = %(now)s WHERE stage = 'running' RETURNING n, submission_id", {"now": now})
        return [sid for _, sid in sorted(rows)]

    def finish(self, submission_id: str, *, result: Manifest, metrics: Mapping[str, Value], now: float) -> Submission:
        with self._tx() as cur:
            row = cur.execute(f"UPDATE submissions SET stage = 'ready', result = %(result)s, metrics = %(metrics)s, "
                              "updated_at = %(now)s, lease_until = NULL WHERE submission_id = %(id)s "
                              f"RETURNING {_SUB}", {"id": submission_id, "result": manifest_to_json(result),
                                                    "metrics": json.dumps(dict(typed_values(metrics))), "now": now}).fetchone()
            sub = _submission(_found(row, "submission", submission_id))
            _make_peer(cur, sub)
        return sub

    def fail(self, submission_id: str, *, error: str, now: float) -> Submission:
        row = self._one(f"UPDATE submissions SET stage = 'failed', error = %(error)s, updated_at = %(now)s, "
                        f"lease_until = NULL WHERE submission_id = %(id)s RETURNING {_SUB}",
                        {"id": submission_id, "error": error, "now": now})
        return _submission(_found(row, "submission", submission_id))

    # ---- events ----------------------------------------------------------------------------
    def append_event(self, submission_id: str, kind: EventKind, fields: Mapping[str, Value], *, now: float) -> Event:
        with self._tx() as cur:
            return _append(cur, submission_id, kind, fields, now)

    def events_after(self, submission_id: str, after_seq: int) -> list[Event]:
        with self._tx() as cur:
            if cur.execute("SELECT 1 FROM submissions WHERE submission_id = %(id)s", {"id": submission_id}).fetchone() \
                    is None:
                _found(None, "submission", submission_id)
            rows = cur.execute("SELECT submission_id, seq, kind, time, fields FROM events WHERE submission_id = %(id)s "
                               "AND seq > %(after)s ORDER BY seq", {"id": submission_id, "after": after_seq}).fetchall()
        return [Event(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]

    # ---- the queue -------------------------------------------------------------------------
    def queue_position(self, submission_id: str) -> int:
        row = self._one("SELECT COUNT(*) FROM submissions q, submissions s WHERE s.submission_id = %(id)s "
                        "AND s.stage = 'queued' AND q.stage = 'queued' AND q.n <= s.n", {"id": submission_id})
        return row[0]

    def queued(self) -> list[str]:
        return [r[0] for r in self._all("SELECT submission_id FROM submissions WHERE stage = 'queued' ORDER BY n", {})]

    def queue_depth(self) -> int:
        return self._one("SELECT COUNT(*) FROM submissions WHERE stage = 'queued'", {})[0]

    def queued_count(self, silo: str) -> int:
        return self._one("SELECT COUNT(*) FROM submissions WHERE stage = 'queued' AND silo = %(silo)s",
                         {"silo": silo})[0]

    def peers(self, task: str) -> dict[str, str]:
        return dict(self._all("SELECT silo, submission_id FROM peers WHERE task = %(task)s ORDER BY silo",
                              {"task": task}))

    def check_writable(self) -> None:
        try:
            with self._tx() as cur:
                cur.execute("INSERT INTO meta (key, value) VALUES ('write_probe', %(now)s) "
                            "ON CONFLICT (key) DO UPDATE SET value = excluded.value", {"now": repr(time.time())})
        except (psycopg.Error, PoolTimeout) as e:
            raise PreconditionError(f"store {_safe(self.dsn)} is not writable: {e}") from e

    def close(self) -> None:
        self._pool.close()

    # ---- leases (LeaseStore) ---------------------------------------------------------------
    def claim(self, *, worker: str, lease_s: float, now: float) -> Lease | None:
        for _ in range(5):
            try:
                with self._tx() as cur:
                    row = cur.execute(_CLAIM, {"worker": worker, "until": now + lease_s, "now": now}).fetchone()
                    if row is None:
                        return None
                    sub = _submission(row)
                    head = cur.execute("SELECT version FROM adapter_head WHERE task = %(task)s",
                                       {"task": sub.task}).fetchone()
                return Lease(sub, worker, row[10], now + lease_s, row[11], head[0] if head else 0)
            except pg_errors.UniqueViolation:
                # another worker claimed a round of the same task at the same moment: the index
                # one_running_round_per_task refused this one; look again (that task is skipped now)
                continue
        return None

    def heartbeat(self, lease: Lease, *, lease_s: float, now: float) -> Lease:
        row = self._one("UPDATE submissions SET lease_until = %(until)s WHERE submission_id = %(id)s "
                        "AND token = %(token)s AND stage = 'running' RETURNING lease_until",
                        {"id": lease.submission.submission_id, "token": lease.token, "until": now + lease_s})
        if row is None:
            raise LeaseLostError(_lost(lease))
        return Lease(lease.submission, lease.worker, lease.token, row[0], lease.attempt, lease.adapter_version)

    def release(self, lease: Lease, *, now: float) -> bool:
        row = self._one("UPDATE submissions SET stage = 'queued', worker = '', lease_until = NULL, updated_at = %(now)s "
                        "WHERE submission_id = %(id)s AND token = %(token)s AND stage = 'running' RETURNING 1",
                        {"id": lease.submission.submission_id, "token": lease.token, "now": now})
        return row is not None

    def reap_expired(self, *, now: float, max_attempts: int) -> tuple[list[str], list[str]]:
        with self._tx() as cur:
            rows = cur.execute(
                "UPDATE submissions SET stage = CASE WHEN attempts >= %(max)s THEN 'failed' ELSE 'queued' END, "
                "error = CASE WHEN attempts >= %(max)s THEN %(why)s || attempts || ' times: dead-lettered, submit again' "
                "ELSE error END, worker = '', lease_until = NULL, updated_at = %(now)s "
                "WHERE stage = 'running' AND lease_until < %(now)s RETURNING n, submission_id, stage, error",
                {"now": now, "max": max_attempts, "why": "the round's worker was lost "}).fetchall()
            requeued, dead = [], []
            for n, sid, stage, error in sorted(rows):
                if stage == "queued":
                    (position,) = cur.execute("SELECT COUNT(*) FROM submissions WHERE stage = 'queued' AND n <= %(n)s",
                                              {"n": n}).fetchone()
                    _append(cur, sid, EventKind.QUEUED, {"position": position, "rerun": True}, now)
                    requeued.append(sid)
                else:
                    _append(cur, sid, EventKind.FAILED, {"reason": error}, now)
                    dead.append(sid)
        return requeued, dead

    def finish_leased(self, lease: Lease, *, result: Manifest, metrics: Mapping[str, Value], now: float,
                      adapter_uri: str | None, ready_fields: Mapping[str, Value]) -> tuple[Submission, Event]:
        sid = lease.submission.submission_id
        with self._tx() as cur:
            row = cur.execute(f"UPDATE submissions SET stage = 'ready', result = %(result)s, metrics = %(metrics)s, "
                              "updated_at = %(now)s, lease_until = NULL WHERE submission_id = %(id)s "
                              f"AND token = %(token)s AND stage = 'running' RETURNING {_SUB}",
                              {"id": sid, "token": lease.token, "result": manifest_to_json(result),
                               "metrics": json.dumps(dict(typed_values(metrics))), "now": now}).fetchone()
            if row is None:
                raise LeaseLostError(_lost(lease))
            sub = _submission(row)
            if adapter_uri is not None:
                _publish_adapter(cur, lease, adapter_uri, now)
            _make_peer(cur, sub)
            event = _append(cur, sid, EventKind.READY, ready_fields, now)
        return sub, event

    def fail_leased(self, lease: Lease, *, error: str, now: float) -> tuple[Submission, Event]:
        sid = lease.submission.submission_id
        with self._tx() as cur:
            row = cur.execute(f"UPDATE submissions SET stage = 'failed', error = %(error)s, updated_at = %(now)s, "
                              "lease_until = NULL WHERE submission_id = %(id)s AND token = %(token)s "
                              f"AND stage = 'running' RETURNING {_SUB}",
                              {"id": sid, "token": lease.token, "error": error, "now": now}).fetchone()
            if row is None:
                raise LeaseLostError(_lost(lease))
            return _submission(row), _append(cur, sid, EventKind.FAILED, {"reason": error}, now)

    def adapter_versions(self, task: str) -> list[AdapterRecord]:
        rows = self._all("SELECT task, version, submission_id, uri, created_at FROM adapter_versions "
                         "WHERE task = %(task)s ORDER BY version", {"task": task})
        return [AdapterRecord(*r) for r in rows]


def _publish_adapter(cur, lease: Lease, uri: str, now: float) -> None:
    """Compare-and-swap the task's adapter head from the version the round ran on to the next."""
    task, base = lease.submission.task, lease.adapter_version
    cur.execute("INSERT INTO adapter_head (task, version) VALUES (%(task)s, 0) ON CONFLICT (task) DO NOTHING",
                {"task": task})
    row = cur.execute("UPDATE adapter_head SET version = version + 1 WHERE task = %(task)s AND version = %(base)s "
                      "RETURNING version", {"task": task, "base": base}).fetchone()
    if row is None:
        raise AdapterConflictError(f"task {task!r}: adapter version {base + 1} was published by another round while "
                                   f"submission {lease.submission.submission_id!r} ran on version {base}; the round "
                                   "runs again on the new version")
    cur.execute("INSERT INTO adapter_versions (task, version, submission_id, uri, created_at) "
                "VALUES (%(task)s, %(v)s, %(sid)s, %(uri)s, %(now)s)",
                {"task": task, "v": row[0], "sid": lease.submission.submission_id, "uri": uri, "now": now})


def _make_peer(cur, sub: Submission) -> None:
    cur.execute("INSERT INTO peers (task, silo, submission_id) VALUES (%(task)s, %(silo)s, %(id)s) "
                "ON CONFLICT (task, silo) DO UPDATE SET submission_id = excluded.submission_id",
                {"task": sub.task, "silo": sub.silo, "id": sub.submission_id})


def _append(cur, submission_id: str, kind: EventKind, fields: Mapping[str, Value], now: float) -> Event:
    """The next sequence number comes from the submission's row, locked by this update: writers in
    different processes never take the same one."""
    row = cur.execute("UPDATE submissions SET last_seq = last_seq + 1 WHERE submission_id = %(id)s RETURNING last_seq",
                      {"id": submission_id}).fetchone()
    (seq,) = _found(row, "submission", submission_id)
    cur.execute("INSERT INTO events (submission_id, seq, kind, time, fields) VALUES (%(id)s, %(seq)s, %(kind)s, "
                "%(time)s, %(fields)s)", {"id": submission_id, "seq": seq, "kind": kind, "time": now,
                                          "fields": json.dumps(dict(typed_values(fields)))})
    return Event(submission_id, seq, kind, now, dict(fields))


def _lost(lease: Lease) -> str:
    return (f"submission {lease.submission.submission_id!r}: worker {lease.worker!r} lost its lease (token "
            f"{lease.token}); another worker runs the round, this result is thrown away")


def _safe(dsn: str) -> str:
    """The dsn without a password, for messages."""
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the configured dsn"
    return " ".join(f"{k}={v}" for k, v in info.items() if k != "password")


def _upload(row: tuple) -> Upload:
    return Upload(upload_id=row[0], silo=row[1], manifest=manifest_from_json(row[2]), complete=bool(row[3]),
                  created_at=row[4])


def _submission(row: tuple) -> Submission:
    return Submission(submission_id=row[0], upload_id=row[1], silo=row[2], task=row[3], stage=row[4],
                      created_at=row[5], updated_at=row[6], error=row[7],
                      result=manifest_from_json(row[8]) if row[8] else None, metrics=json.loads(row[9]))
