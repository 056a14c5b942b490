"""The scaled shape's settings and the PostgreSQL store's start: refused with the field named."""
import subprocess
import sys

import pytest

from crosslm_shared.errors import ConfigError, PreconditionError
from crosslm_server.service.config import ServerConfig, StoreSection, WorkerSection


def test_front_ends_and_workers_apart_need_postgres():
    with pytest.raises(ConfigError, match="builtin = false needs .store. kind = 'postgres' .got 'sqlite'"):
        ServerConfig(worker=WorkerSection(builtin=False))
    with pytest.raises(ConfigError, match=r"\[store\] dsn=''"):
        StoreSection(kind="postgres")
    with pytest.raises(ConfigError, match=r"heartbeat_s=30.*lease_s / 3 \(20\)"):
        WorkerSection(lease_s=60, heartbeat_s=30)
    ServerConfig(store=StoreSection(kind="postgres", dsn="host=db"), worker=WorkerSection(builtin=False))


def test_a_worker_on_sqlite_exits_2_saying_why(tmp_path):
    cfg = tmp_path / "server.toml"
    cfg.write_text('[store]\nkind = "sqlite"\n')
    r = subprocess.run([sys.executable, "-m", "crosslm_server.service.cli", "worker", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "kind = 'postgres'" in r.stderr, r.stderr


def test_an_unreachable_postgres_is_named_without_its_password():
    pytest.importorskip("psycopg")
    from crosslm_server.service.store.postgres import PostgresStore

    with pytest.raises(PreconditionError, match="no PostgreSQL answered") as e:
        PostgresStore("host=/nonexistent-dir user=crosslm password=sekret-123 dbname=x", connect_timeout_s=1)
    assert "sekret" not in str(e.value) and "/nonexistent-dir" in str(e.value)


def test_migrations_apply_once_and_a_newer_schema_is_refused(pg_dsn):
    import psycopg

    from crosslm_server.service.store.postgres import PostgresStore, migrations

    PostgresStore(pg_dsn, pool_size=1).close()
    store = PostgresStore(pg_dsn, pool_size=1)  # a second start applies nothing again
    store.close()
    with psycopg.connect(pg_dsn) as conn:
        assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations")] == [v for v, _ in migrations()]
        conn.execute("INSERT INTO schema_migrations (version) VALUES (999)")
    with pytest.raises(PreconditionError, match=r"schema version\(s\) \[999\].*upgrade CrossLM"):
        PostgresStore(pg_dsn, pool_size=1)
