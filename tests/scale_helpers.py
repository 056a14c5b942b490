"""The scaled shape as real processes, for tests and benchmarks: `crosslm-server serve --no-worker`
front-ends and `crosslm-server worker` processes on one PostgreSQL store and one shared data_dir."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

TASKS = {"rt": ("neg", "pos"), "rt2": ("neg", "pos")}


def server_toml(*, store: str, engine: str, engine_options: str, server: str = "", worker: str = "") -> str:
    """A test server's TOML: plaintext on free localhost ports, data_dir "data" next to the file."""
    return "\n".join(["[server]", 'grpc_host = "127.0.0.1"', "grpc_port = 0", 'http_host = "127.0.0.1"',
                      "http_port = 0", 'data_dir = "data"', "plaintext_dev_mode = true", "grace_s = 2", server,
                      "[store]", store, "[worker]", worker, "[engine]", f'name = "{engine}"', "[engine.options]",
                      engine_options, ""])


def write_config(root: Path, dsn: str, *, step_seconds: float = 0.0, lease_s: float = 3.0, heartbeat_s: float = 0.5,
                 max_attempts: int = 3, poll_s: float = 0.1, steps: int = 2, builtin: bool = False,
                 store: str = "postgres") -> Path:
    """One config for every process of the cluster (they differ by subcommand and flags)."""
    root.mkdir(parents=True, exist_ok=True)
    tasks = ", ".join(f'{name} = {list(labels)!r}'.replace("'", '"') for name, labels in TASKS.items())
    path = root / "server.toml"
    path.write_text(server_toml(
        server="max_queued_per_silo = 8", store=f'kind = "{store}"\ndsn = "{dsn}"',
        worker=f"builtin = {str(builtin).lower()}\nlease_s = {lease_s}\nheartbeat_s = {heartbeat_s}\n"
               f"max_attempts = {max_attempts}\npoll_s = {poll_s}",
        engine="fakes.tiny_engine:TinyEngine",
        engine_options=f'step_seconds = {step_seconds}\nsteps = {steps}\nadapters_dir = "data/adapters"\n'
                       f"tasks = {{ {tasks} }}"))
    return path


class Proc:
    """One `crosslm-server` process; `start()` returns once it says it is up."""

    READY = {"serve": r"serving gRPC \(\w+\) on [^:]+:(\d+)", "worker": r"worker (\S+): claiming rounds"}

    def __init__(self, config: Path, command: str, name: str, *extra: str):
        self.config, self.command, self.name, self.extra = config, command, name, extra
        self.log = config.parent / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self, timeout_s: float = 120) -> "Proc":
        argv = [sys.executable, "-m", "crosslm_server.service.cli", self.command, "--config", str(self.config),
                *self.extra]
        if self.command == "worker":
            argv += ["--name", self.name]
        with self.log.open("a") as f:
            since = f.tell()  # a restart appends: look only at what this start writes
            self.proc = subprocess.Popen(argv, stderr=f, stdout=f, cwd=self.config.parent)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = re.search(self.READY[self.command], self.log.read_text()[since:])
            if match:
                self.port = int(match.group(1)) if self.command == "serve" else None
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}: {self.log.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"{self.name} did not start: {self.log.read_text()}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def front_end(config: Path, name: str = "frontend") -> Proc:
    return Proc(config, "serve", name, "--no-worker")


def worker(config: Path, name: str) -> Proc:
    return Proc(config, "worker", name)


def wait_for(condition, *, timeout_s: float = 120, every_s: float = 0.05, what: str = "condition"):
    """Poll until `condition()` is truthy; its value. A deadline for a hang, not a speed check."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")
