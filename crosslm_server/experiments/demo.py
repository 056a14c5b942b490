"""`crosslm demo`: one server and four silo daemons as local processes, over real gRPC with mTLS.

:func:`prepare` writes everything a run needs into one folder: certificates (`crosslm certs`),
the silos' private data and the public test sets (`crosslm-client prepare-demo`, the cut
`crosslm simulate` makes), ``server.toml`` and one ``silo-X.toml`` per silo (the shape of
``examples/server.toml`` and ``examples/silo-a.toml``), on free localhost ports. :func:`run` starts
``crosslm-server serve`` and one ``crosslm-client run`` per silo as child processes, shows what
each is doing (the silos' ``status.json``, the server's ``/readyz`` and ``/v1/submissions``), stops
every child on Ctrl-C or when one fails (naming it, with the end of its log), and at the end writes
``report.json``, ``report.md`` and the plots (:mod:`crosslm_server.experiments.demo_report`).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from crosslm_shared.errors import ConfigError

log = logging.getLogger(__name__)

SILO_ARCHS = ("minilm", "mpnet4", "tiny")  # what the silo daemon trains (crosslm_client.config.Arch)
CLIENT_EXITS = {2: "bad config or data", 3: "the server refused its identity",
                4: "the server was unreachable or refused a request", 5: "a model package is missing",
                130: "stopped"}
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


@dataclass(frozen=True)
class DemoSettings:
    """What `crosslm demo` runs; every field is a flag of the command."""

    config: Path                          # engine config: [llm], [round.*], [split], [eval], task, seed, archs
    out: Path                             # the run's folder (must be empty or absent)
    silos: int = 4                        # silo daemons (silo-a, silo-b, …); replaces the config's split.n_silos
    archs: tuple[str, ...] = ()           # SLM architecture per silo, cycled (default: the config's archs)
    rounds: int | None = None             # rounds per silo (default: the config's rounds)
    llm_eval_texts: int = 100             # the LLM's zero-shot test texts measured per evaluation (0 = all)
    llm_eval_docs: int = 10               # general-corpus documents for its perplexity
    continue_epochs: int | None = None    # epochs a silo continues a returned SLM (default: [round.slm] max_epochs)
    sets: tuple[str, ...] = ()            # engine config overrides, section.key=value


@dataclass(frozen=True)
class Layout:
    """A prepared run: where everything is, and how to reach the server."""

    out: Path
    task: str
    archs: dict[str, str]                 # silo name -> architecture
    rounds: int
    grpc_port: int
    http_port: int
    header: dict[str, Any] = field(default_factory=dict)  # report.json's task, seed, config, settings
    operator_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))  # for /v1/submissions

    @property
    def server_toml(self) -> Path:
        return self.out / "server.toml"

    def silo_toml(self, name: str) -> Path:
        return self.out / f"{name}.toml"

    def log(self, name: str) -> Path:
        return self.out / "logs" / f"{name}.log"


# ---- preparing a run ----------------------------------------------------------------------------
def prepare(settings: DemoSettings) -> Layout:
    """Certificates, data and configs into ``settings.out``; nothing runs yet."""
    from crosslm_shared.demo_data import prepare_demo
    from crosslm_server.method.config import load_config
    from crosslm_shared.certs import make_certs
    from crosslm_shared.tasks import load_task

    out = settings.out.resolve()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {str(settings.out)!r} is not empty: choose a new folder (a demo never "
                          "overwrites an earlier run)")
    if not 1 <= settings.silos <= 26:
        raise ConfigError(f"--silos {settings.silos}: choose 1 to 26")
    overrides = [*settings.sets, f"split.n_silos={settings.silos}"]
    if settings.rounds is not None:
        overrides.append(f"rounds={settings.rounds}")
    config = Path(settings.config).resolve()
    cfg = load_config(config, overrides)
    archs = settings.archs or cfg.archs
    bad = [a for a in archs if a not in SILO_ARCHS]
    if bad:
        raise ConfigError(f"silo architecture(s) {bad} cannot run in the silo daemon; use --archs with "
                          f"{', '.join(SILO_ARCHS)}")
    if "mpnet4" in archs:
        # assembled once into the cache here: two mpnet4 daemons starting together would race to build it
        from crosslm_shared.assets import mpnet_dir

        mpnet_dir()
    task = load_task(cfg.task)
    names = [f"silo-{c}" for c in string.ascii_lowercase[:settings.silos]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir()
    make_certs(out / "certs", server_hosts=[], silos=names)
    prepare_demo(cfg.task, out / "data", split=cfg.split, seed=cfg.seed, public_out=out / "data" / "public")
    layout = Layout(out, task.name, {n: archs[i % len(archs)] for i, n in enumerate(names)}, cfg.rounds,
                    _free_port(), _free_port())
    layout.server_toml.write_text(_server_toml(layout, config, cfg, settings))
    for name in names:
        layout.silo_toml(name).write_text(_silo_toml(layout, name, task, cfg, settings))
    header = report_header(cfg, config, task, demo={
        "silos": layout.archs, "rounds": cfg.rounds, "llm_eval_texts": settings.llm_eval_texts,
        "llm_eval_docs": settings.llm_eval_docs, "llm_eval_every": len(names),
        "continue_epochs": settings.continue_epochs or cfg.round.slm.max_epochs, "set": list(settings.sets)})
    return replace(layout, header=header)


def report_header(cfg, config: Path, task, *, demo: dict[str, Any]) -> dict[str, Any]:
    """report.json's fields that describe the run rather than measure it."""
    from crosslm_server.method.config import as_dict

    return {"task": task.name, "labels": task.label_names, "seed": cfg.seed, "config": as_dict(cfg),
            "config_file": str(config), "demo": demo,
            "title": f"CrossLM demo: {task.name}, {len(demo['silos'])} silos over gRPC with mTLS (seed {cfg.seed})"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(str(value)) if isinstance(value, (str, Path)) else repr(value)


def _server_toml(layout: Layout, config: Path, cfg, settings: DemoSettings) -> str:
    n_silos = len(layout.archs)
    return f"""# `crosslm demo` server: the shape of examples/server.toml, on free localhost ports.
# Relative paths are resolved against this file's folder.
[server]
grpc_host = "127.0.0.1"
grpc_port = {layout.grpc_port}
http_host = "127.0.0.1"
http_port = {layout.http_port}
operator_token = {_toml(layout.operator_token)}   # the demo's progress lines read /v1/submissions with it
data_dir = "server"
plaintext_dev_mode = false    # mTLS: silos present the certificates from certs/
tls_cert = "certs/server.pem"
tls_key = "certs/server.key"
tls_ca = "certs/ca.pem"
grace_s = 5                   # Ctrl-C: a round still running is dropped after 5 s (it would rerun on restart)
log_level = "INFO"

[store]
kind = "sqlite"

[engine]
name = "crosslm"

[engine.options]
config = {_toml(config)}
tasks = [{_toml(layout.task if Path(cfg.task).suffix != ".toml" else Path(cfg.task).resolve())}]
eval_data = "data/public/llm-test.csv"   # the LLM's zero-shot test set: no silo holds these texts
eval_texts = {settings.llm_eval_texts}
eval_every = {n_silos}                     # measure the LLM once per round of the {n_silos} silos
set = {_toml([*settings.sets, f"eval.n_ppl_docs={settings.llm_eval_docs}"])}
"""


def _silo_toml(layout: Layout, name: str, task, cfg, settings: DemoSettings) -> str:
    slm = cfg.round.slm
    return f"""# `crosslm demo` {name}: the shape of examples/silo-a.toml, on the demo's localhost port.
# Relative paths are resolved against this file's folder.
output_dir = {_toml(name)}

[silo]
name = {_toml(name)}
task = {_toml(task.name)}
labels = {_toml(task.label_names)}
data = "data/{name}.csv"                      # private: never leaves this silo
test_data = "data/public/{name}-test.csv"     # public test examples, for the reports only
heldout_fraction = {cfg.split.val_fraction}
seed = {cfg.seed}
arch = {_toml(layout.archs[name])}

[server]
address = "127.0.0.1:{layout.grpc_port}"
ca = "certs/ca.pem"
cert = "certs/{name}.pem"
key = "certs/{name}.key"

[train]                                       # the engine config's [round.slm], as crosslm simulate trains
epochs = {slm.max_epochs}
lrs = {_toml(list(slm.lrs))}
batch_size = {slm.batch_size}
continue_epochs = {slm.max_epochs if settings.continue_epochs is None else settings.continue_epochs}

[rounds]
count = {layout.rounds}
interval_s = 0
"""


# ---- running it ---------------------------------------------------------------------------------
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
    from crosslm_server.experiments.demo_report import DemoReportError, summary, write_demo_report

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
