"""`crosslm demo`: one server and four silo daemons as local processes, over real gRPC with mTLS.

:func:`prepare` writes everything a run needs into one folder: certificates (`crosslm certs`),
the silos' private data and the public test sets (`crosslm-client prepare-demo`, the cut
`crosslm simulate` makes), ``server.toml`` and one ``silo-X.toml`` per silo (the shape of
``examples/server.toml`` and ``examples/silo-a.toml``), on free localhost ports; the supervisor
(:mod:`crosslm_server.experiments.demo_supervisor`) runs it.
"""
from __future__ import annotations

import logging
import secrets
import socket
import string
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from crosslm_shared.errors import ConfigError
from crosslm_shared.plugins import is_import_path

log = logging.getLogger(__name__)

SILO_ARCHS = ("minilm", "mpnet4")  # what the silo daemon trains, besides a module:attribute model family
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
    labels: tuple[str, ...] = ()          # the task's label names in class-index order
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
    bad = [a for a in archs if a not in SILO_ARCHS and not is_import_path(a)]
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
                    _free_port(), _free_port(), labels=tuple(task.label_names))
    _write_configs(layout, cfg, settings)
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


def _write_toml(path: Path, header: str, table: dict[str, Any]) -> None:
    """A config file the daemons read: a comment naming what it is, then the table (tomli-w)."""
    from crosslm_shared.schema import to_toml

    path.write_text("".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + "\n" + to_toml(table))


def _write_configs(layout: Layout, cfg, settings: DemoSettings) -> None:
    from crosslm_server.method.config import EngineConfig
    from crosslm_shared.schema import as_table

    n_silos = len(layout.archs)
    engine = as_table(cfg)
    engine = {k: v for k, v in engine.items() if k in {f.name for f in fields(EngineConfig)}}
    if Path(cfg.task).suffix == ".toml":
        engine["task"] = str(Path(cfg.task).resolve())
    _write_toml(layout.out / "engine.toml", "`crosslm demo` round settings: the config's task, [llm], [round.*] and [eval]\n"
                "(crosslm_server.method.config.EngineConfig; every key: docs/config.md).", engine)
    server = {
        "server": {"grpc_host": "127.0.0.1", "grpc_port": layout.grpc_port, "http_host": "127.0.0.1",
                   "http_port": layout.http_port, "operator_token": layout.operator_token, "data_dir": "server",
                   "plaintext_dev_mode": False, "tls_cert": "certs/server.pem", "tls_key": "certs/server.key",
                   "tls_ca": "certs/ca.pem", "grace_s": 5, "log_level": "INFO"},
        "store": {"kind": "sqlite"},
        "engine": {"name": "crosslm", "options": {
            "config": "engine.toml", "tasks": [engine["task"]],
            "eval_data": "data/public/llm-test.csv", "eval_texts": settings.llm_eval_texts,
            "eval_every": n_silos, "set": [*settings.sets, f"eval.n_ppl_docs={settings.llm_eval_docs}"]}},
    }
    _write_toml(layout.server_toml, "`crosslm demo` server: the shape of examples/server.toml, on free localhost ports,\n"
                "with mTLS (certs/) and the operator token the demo's progress lines read /v1/submissions with.\n"
                f"The LLM is measured on data/public/llm-test.csv (no silo holds it) once per round of the {n_silos} "
                "silos.\nRelative paths are resolved against this file's folder.", server)
    train = as_table(cfg.round.slm) | {"continue_epochs": cfg.round.slm.max_epochs if settings.continue_epochs is None
                                       else settings.continue_epochs}
    del train["seed"]  # the silo trains with [silo] seed
    for name in layout.archs:
        silo = {
            "output_dir": name,
            "silo": {"name": name, "task": layout.task, "labels": list(layout.labels), "data": f"data/{name}.csv",
                     "test_data": f"data/public/{name}-test.csv", "heldout_fraction": cfg.split.val_fraction,
                     "seed": cfg.seed, "arch": layout.archs[name]},
            "server": {"address": f"127.0.0.1:{layout.grpc_port}", "ca": "certs/ca.pem", "cert": f"certs/{name}.pem",
                       "key": f"certs/{name}.key"},
            "train": train,
            "rounds": {"count": layout.rounds, "interval_s": 0},
        }
        if cfg.privacy.enabled:  # the config's DP settings become each silo's [privacy] (docs/privacy.md)
            silo["privacy"] = as_table(cfg.privacy)
        _write_toml(layout.silo_toml(name), f"`crosslm demo` {name}: the shape of examples/silo-a.toml, on the demo's "
                    f"localhost port.\ndata/{name}.csv is private: it never leaves this silo. [train] is the engine "
                    "config's [round.slm],\nas crosslm simulate trains. Relative paths are resolved against this "
                    "file's folder.", silo)
