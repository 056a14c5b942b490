"""The demo's supervisor: :func:`run` starts ``crosslm-server serve`` and one ``crosslm-client run``
per silo of a prepared folder (:func:`crosslm_server.experiments.demo.prepare`) as child
processes, shows what each is doing (the silos' ``status.json``, the server's ``/readyz`` and
``/v1/submissions``), stops every child on Ctrl-C or when one fails (naming it, with the end of its
log), and at the end writes ``report.json``, ``report.md`` and the plots
(:mod:`crosslm_server.experiments.demo_report`).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from crosslm_server.experiments.demo import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, Layout

log = logging.getLogger(__name__)
CLIENT_EXITS = {2: "bad config or data", 3: "the server refused its identity",
                4: "the server was unreachable or refused a request", 5: "a model package is missing",
                130: "stopped"}


def _command(script: str, module: str, *args: str) -> list[str]:
    """The console script beside this interpreter (what compose runs), else the same module via -m."""
    exe = Path(sys.executable).parent / script
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", module, *args]


# The silos stand for four other machines: on this one they yield the CPU to the server, whose
# rounds are the demo's critical path (the silos train while the server works on another's round).
SILO_NICE = 10


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TQDM_MININTERVAL="30")
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def _preexec(niceness: int) -> Callable[[], None]:
    def setup() -> None:
        try:  # Linux: the child gets SIGTERM if the demo dies without stopping it
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if niceness:
            os.nice(niceness)
            # each child leads its own session, and Linux (sched_autogroup) shares the CPU between
            # sessions before it looks at nice values: the session's own weight must drop too
            try:
                Path("/proc/self/autogroup").write_text(str(niceness))
            except OSError:
                pass
    return setup


class Child:
    """One child process with its log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, *, cwd: Path, env: dict[str, str], niceness: int):
        self.name, self.argv, self.log_path = name, argv, log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=cwd, env=env, start_new_session=True, preexec_fn=_preexec(niceness))

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        self._log.close()

    def tail(self, lines: int = 25) -> str:
        """The log's last non-empty lines (progress bars' carriage returns count as line ends)."""
        text = self.log_path.read_text(errors="replace").replace("\r", "\n")
        return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])

    def shown(self) -> str:
        """The command as a person would type it."""
        return " ".join([Path(self.argv[0]).name, *self.argv[1:]])


class ChildFailed(Exception):
    """A child exited on its own with a code other than 0, or (the server) cannot work."""

    def __init__(self, child: Child, code: int | None, reason: str = ""):
        meaning = CLIENT_EXITS.get(code, f"killed by signal {-code}" if code and code < 0 else "error")
        super().__init__(reason or f"{child.name} exited with code {code} ({meaning})")
        self.child, self.code = child, code


def _stop_all(children: list[Child], *, grace: float = 20.0) -> None:
    """Silos first (they exit 130 on SIGTERM), then the server; SIGKILL for whatever is left."""
    silos = [c for c in children if c.name != "server"]
    server = [c for c in children if c.name == "server"]
    for group in (silos, server):
        for c in group:
            c.stop()
        deadline = time.monotonic() + grace
        for c in group:
            if c.wait(max(0.1, deadline - time.monotonic())) is None:
                log.warning("%s did not stop within %.0f s: killed", c.name, grace)
                c.stop(signal.SIGKILL)
                c.wait(5)
    for c in children:
        c.close()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _echo(line: str) -> None:
    """Progress lines reach a pipe (``| tee``, a test) as they happen, not when a buffer fills."""
    print(line, flush=True)


def run(layout: Layout, *, timeout_s: float = 0, echo: Callable[[str], None] = _echo) -> int:
    """Start the server and the silos, follow them to the end, write the report. Returns the exit code."""
    from crosslm_server.experiments.demo_progress import Progress

    started = time.monotonic()
    cpus = os.cpu_count() or 2
    children: list[Child] = []
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    # a process started from a background job inherits SIGINT ignored; the demo answers it anyway
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        children.append(Child("server", _command("crosslm-server", "crosslm_server.service.cli", "serve", "--config",
                                                  str(layout.server_toml)),
                               layout.log("server"), cwd=layout.out, env=_child_env(cpus), niceness=0))
        for name in layout.archs:
            children.append(Child(name, _command("crosslm-client", "crosslm_client.cli", "run", "--config",
                                                 str(layout.silo_toml(name))),
                                  layout.log(name), cwd=layout.out,
                                  env=_child_env(max(1, cpus // len(layout.archs))), niceness=SILO_NICE))
        for c in children:
            echo(f"started {c.name} (pid {c.proc.pid}): {c.shown()}")
        echo(f"logs: {layout.out / 'logs'}; server: http://127.0.0.1:{layout.http_port}/v1/submissions, /metrics")
        progress = Progress(layout, echo=echo, started=started)
        _follow(children, progress, started=started, timeout_s=timeout_s)
    except KeyboardInterrupt:
        echo("\nstopping every process (Ctrl-C) ...")
        _stop_all(children)
        echo(f"stopped. Logs: {layout.out / 'logs'}")
        return EXIT_INTERRUPTED
    except ChildFailed as e:
        _stop_all(children, grace=10)
        echo(f"\nFAILED: {e}; the demo stopped every other process.\n"
             f"last lines of {e.child.log_path}:\n" + _indent(e.child.tail()))
        return EXIT_FAILED
    except TimeoutError as e:
        _stop_all(children, grace=10)
        echo(f"\nFAILED: {e}; every process was stopped. Logs: {layout.out / 'logs'}")
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    _stop_all(children)
    return _report(layout, time.monotonic() - started, echo)


def _follow(children: list[Child], progress, *, started: float, timeout_s: float) -> None:
    """Until every silo exited 0; raises ChildFailed for any other exit (the server's included)."""
    silos = [c for c in children if c.name != "server"]
    while True:
        for c in children:
            code = c.poll()
            if code is not None and (code != 0 or c.name == "server"):
                raise ChildFailed(c, code)
        progress.update()
        if progress.server_failure:
            raise ChildFailed(children[0], None, f"the server cannot run rounds: {progress.server_failure}")
        if all(c.poll() == 0 for c in silos):
            progress.update(final=True)
            return
        if timeout_s and time.monotonic() - started > timeout_s:
            raise TimeoutError(f"the demo ran past --timeout {timeout_s:.0f} s")
        time.sleep(0.5)


def _indent(text: str) -> str:
    return "\n".join(f"    {ln}" for ln in text.splitlines())


def _report(layout: Layout, seconds: float, echo: Callable[[str], None]) -> int:
    from crosslm_server.experiments.demo_report import summary, write_demo_report
    from crosslm_shared.errors import DemoReportError

    try:
        report = write_demo_report(layout.out, {n: layout.out / n for n in layout.archs}, rounds=layout.rounds,
                                   header=layout.header, seconds=seconds)
    except DemoReportError as e:
        echo(f"\nFAILED: {e}. Logs: {layout.out / 'logs'}")
        return EXIT_FAILED
    echo(f"\ndone in {seconds / 60:.1f} min. {summary(report)}")
    echo(f"report: {layout.out / 'report.md'}\n        {layout.out / 'report.json'}\n        " +
         "\n        ".join(str(layout.out / p) for p in report["plots"]))
    echo(f"logs: {layout.out / 'logs'}; the server's state and adapter versions: {layout.out / 'server'} "
         f"(crosslm-server adapters list --config {layout.server_toml})")
    return EXIT_OK
