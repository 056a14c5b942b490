"""A throw-away PostgreSQL server for the tests and benchmarks: initdb + pg_ctl in a temporary
folder, listening on a unix socket there only (no TCP port), stopped at the end.

Binaries: PATH, then Debian's /usr/lib/postgresql/<version>/bin (scripts/bootstrap --test installs
them). initdb refuses to run as root, so as root the server runs as the unprivileged `nobody`.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

BINARIES = ("initdb", "pg_ctl", "postgres")


def find_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres, newest version first; None when there is none."""
    found = shutil.which("initdb")
    candidates = ([str(Path(found).resolve().parent)] if found else []) + sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for folder in candidates:
        if all((Path(folder) / b).is_file() for b in BINARIES):
            return Path(folder)
    return None


class PostgresServer:
    """`start()` returns self; `dsn(db)` connects over the socket; `stop()` ends it and its files."""

    def __init__(self, root: Path | None = None, *, bindir: Path | None = None):
        """`root`: an empty or absent folder the server's user can reach; default a new temporary
        folder (as root it must be: pytest's tmp_path sits under a 0700 folder nobody cannot enter)."""
        self.bindir = bindir or find_bindir()
        if self.bindir is None:
            raise FileNotFoundError("no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH or under "
                                    "/usr/lib/postgresql/*/bin: run `bash scripts/bootstrap --test` or "
                                    "`apt-get install postgresql`")
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="crosslm-pg-"))
        self.data, self.socket_dir = self.root / "data", self.root / "sock"
        self.user = "crosslm"
        self._as = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []

    def _run(self, *argv: str) -> None:
        out = subprocess.run([*self._as, *argv], capture_output=True, text=True, timeout=120)
        if out.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stdout}{out.stderr}")

    def start(self) -> "PostgresServer":
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if self._as:
            nobody = pwd.getpwnam("nobody")
            for path in (self.root, self.socket_dir):
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user, "-A", "trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        options = f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off -c max_connections=200"
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                      "-w", "-t", "60", "start")
        except BaseException:
            self.stop()
            raise
        return self

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} user={self.user} dbname={dbname}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its dsn."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # a name we made: [0-9a-z_] only
        return self.dsn(name)

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run([*self._as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                            "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)
