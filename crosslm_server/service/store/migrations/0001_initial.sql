-- PostgreSQL store, schema version 1 (crosslm_server/service/store/postgres.py applies it once).
-- Append-only: a released migration never changes; the next file (0002_*.sql) alters it.
CREATE TABLE uploads (
    upload_id  TEXT PRIMARY KEY,
    silo       TEXT NOT NULL,
    manifest   TEXT NOT NULL,
    complete   BOOLEAN NOT NULL DEFAULT false,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE SEQUENCE fence;
CREATE TABLE submissions (
    n             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    submission_id TEXT NOT NULL UNIQUE,
    upload_id     TEXT NOT NULL UNIQUE,
    silo          TEXT NOT NULL,
    task          TEXT NOT NULL,
    stage         TEXT NOT NULL CHECK (stage IN ('queued', 'running', 'ready', 'failed')),
    error         TEXT NOT NULL DEFAULT '',
    result        TEXT,
    metrics       TEXT NOT NULL DEFAULT '{}',
    created_at    DOUBLE PRECISION NOT NULL,
    updated_at    DOUBLE PRECISION NOT NULL,
    worker        TEXT NOT NULL DEFAULT '',
    token         BIGINT NOT NULL DEFAULT 0,
    lease_until   DOUBLE PRECISION,
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_seq      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX submissions_queued ON submissions (n) WHERE stage = 'queued';
CREATE INDEX submissions_silo ON submissions (silo, n);
CREATE UNIQUE INDEX one_running_round_per_task ON submissions (task) WHERE stage = 'running';
CREATE TABLE events (
    submission_id TEXT NOT NULL REFERENCES submissions (submission_id),
    seq           INTEGER NOT NULL,
    kind          TEXT NOT NULL,
    time          DOUBLE PRECISION NOT NULL,
    fields        TEXT NOT NULL,
    PRIMARY KEY (submission_id, seq)
);
CREATE TABLE peers (
    task          TEXT NOT NULL,
    silo          TEXT NOT NULL,
    submission_id TEXT NOT NULL REFERENCES submissions (submission_id),
    PRIMARY KEY (task, silo)
);
CREATE TABLE adapter_head (
    task    TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
CREATE TABLE adapter_versions (
    task          TEXT NOT NULL,
    version       INTEGER NOT NULL,
    submission_id TEXT NOT NULL UNIQUE REFERENCES submissions (submission_id),
    uri           TEXT NOT NULL,
    created_at    DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (task, version)
);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
