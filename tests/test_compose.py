"""docker-compose.yml, docker-compose.scale.yml and the Dockerfiles, checked without a Docker engine.

Each service's command must be a console script of pyproject.toml that accepts its arguments,
with a config file that exists and loads; the server's health check asks /readyz and says "not
ready" in one line; silos start after the certificates, the data and a healthy server; every volume
is declared; the images take their base and torch source as build args, install from the lock and
run as a non-root user. scripts/compose-check builds and runs it all for real (docs/demo.md).
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from crosslm_client.config import load_silo_config
from crosslm_server.service.config import load_server_config

ROOT = Path(__file__).resolve().parents[1]
SILOS = ("silo-a", "silo-b", "silo-c", "silo-d")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _parser(script: str):
    from crosslm_client.cli import _parser as client_parser
    from crosslm_server.experiments.cli import build_parser
    from crosslm_server.service.cli import _parser as server_parser

    return {"crosslm": build_parser, "crosslm-server": server_parser, "crosslm-client": client_parser}[script]()


def _mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """container path -> (volume, read-only)"""
    out = {}
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        out[target] = (source, mode == ["ro"])
    return out


def _under(path: str | Path, mounts: dict) -> str | None:
    return next((target for target in mounts if str(path).startswith(target.rstrip("/") + "/")), None)


def test_every_command_is_a_console_script_that_accepts_its_arguments(compose):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(compose["services"]) == {"certs", "data", "server", *SILOS, "report"}
    for name, service in compose["services"].items():
        command = service["command"]
        assert isinstance(command, list) and command[0] in scripts, f"{name}: {command}"
        _parser(command[0]).parse_args(command[1:])  # SystemExit on an unknown flag or subcommand
        if "--config" in command:
            config = ROOT / command[command.index("--config") + 1]  # images run in /app, the repository's copy
            assert config.is_file(), f"{name}: {config}"


def test_the_server_config_and_health_check(compose):
    server = compose["services"]["server"]
    config = load_server_config(ROOT / server["command"][server["command"].index("--config") + 1])
    assert not config.server.plaintext_dev_mode and config.engine.name == "crosslm"
    assert Path(config.engine.options["config"]).is_file()  # ../examples/rt-4silo.toml, resolved
    check = " ".join(server["healthcheck"]["test"])
    assert check.endswith(f"docker/healthcheck.py http://127.0.0.1:{config.server.http_port}/readyz")
    assert server["healthcheck"]["start_period"]  # loading and measuring the LLM takes minutes on a CPU
    assert f"{config.server.grpc_port}:{config.server.grpc_port}" in server["ports"]
    mounts = _mounts(server)
    assert mounts[str(config.server.data_dir)] == ("server-state", False)
    for path in (config.server.tls_cert, config.server.tls_key, config.server.tls_ca):
        assert mounts[_under(path, mounts)] == ("certs", True)
    assert mounts[_under(config.engine.options["eval_data"], mounts)] == ("demo-public", True)
    assert "demo-private" not in {v for v, _ in mounts.values()}  # the server never sees private data


def test_silos_start_after_certificates_data_and_a_healthy_server(compose):
    services = compose["services"]
    certs = services["certs"]["command"]
    assert certs[certs.index("--silos") + 1].split(",") == list(SILOS)
    assert certs[certs.index("--server-host") + 1] == "server"
    assert services["server"]["depends_on"] == {"certs": {"condition": "service_completed_successfully"},
                                                "data": {"condition": "service_completed_successfully"}}
    outs = set()
    for name in SILOS:
        silo = services[name]
        assert silo["depends_on"] == {"certs": {"condition": "service_completed_successfully"},
                                      "data": {"condition": "service_completed_successfully"},
                                      "server": {"condition": "service_healthy"}}
        config = load_silo_config(ROOT / silo["command"][silo["command"].index("--config") + 1])
        assert config.silo.name == name and config.server.address == "server:50051"
        mounts = _mounts(silo)
        assert mounts[_under(config.silo.data, mounts)] == ("demo-private", True)
        assert mounts[_under(config.silo.test_data, mounts)] == ("demo-public", True)
        for path in (config.server.ca, config.server.cert, config.server.key):
            assert mounts[_under(path, mounts)] == ("certs", True)
        volume, read_only = mounts[str(config.output_dir)]
        assert not read_only and volume == f"{name}-out"
        outs.add(volume)
    assert len(outs) == 4
    archs = {load_silo_config(ROOT / f"docker/{n}.toml").silo.arch for n in SILOS}
    assert archs == {"minilm", "mpnet4"}  # two SLM architectures among the four silos


def test_the_report_runs_once_every_silo_finished(compose):
    report = compose["services"]["report"]
    assert report["depends_on"] == {s: {"condition": "service_completed_successfully"} for s in SILOS}
    mounts = _mounts(report)
    command = report["command"]
    for item in command[command.index("/report") + 1:]:
        name, _, folder = item.partition("=")
        assert mounts[folder] == (f"{name}-out", True)
    assert mounts[command[command.index("--out") + 1]] == ("report", False)


def test_every_volume_is_declared(compose):
    used = {v for s in compose["services"].values() for v, _ in _mounts(s).values()}
    assert used == set(compose["volumes"])
    assert {"certs", "server-state", "demo-private", "demo-public", *(f"{s}-out" for s in SILOS)} <= used


def test_the_gpu_override_gives_the_server_a_gpu_and_a_cuda_torch():
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
    server = gpu["services"]["server"]
    assert server["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "/whl/cu" in server["build"]["args"]["TORCH_INDEX_URL"]
    assert server["build"]["args"]["TORCH_PIP_FLAGS"] == ""  # the CUDA runtime wheels come with torch
    assert server["build"]["args"]["BASE_IMAGE"] == "${CROSSLM_BASE_IMAGE:-python:3.12-slim}"


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.client"])
def test_dockerfiles_install_from_the_lock_pin_torch_and_drop_root(name):
    text = (ROOT / "docker" / name).read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.12-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    installs = re.findall(r"pip install[^\n]*", text)
    assert re.search(r"^ARG TORCH_PIP_FLAGS=--no-deps$", text, re.M)
    assert 'pip install ${TORCH_PIP_FLAGS} --index-url "${TORCH_INDEX_URL}" -r requirements/torch.txt' in installs
    for line in installs:  # nothing resolved: torch by its pin file, the rest hash-checked from the lock
        assert "--no-deps" in line or "${TORCH_PIP_FLAGS}" in line, line
        assert not re.search(r"\btorch\b", line.replace("requirements/torch.txt", "")), line
        assert "requirements/torch.txt" in line or "--require-hashes" in line or line.endswith(
            "--no-build-isolation ."), line
    assert "HF_HUB_OFFLINE=1" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    for copied in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for path in copied.split():
            assert list(ROOT.glob(path.rstrip("/"))), path


def test_both_images_share_their_first_layers():
    """The client build reuses the server's torch layer only if the text up to it is the same."""
    def head(name):
        text = (ROOT / "docker" / name).read_text()
        lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
        return lines[:next(i for i, ln in enumerate(lines) if "requirements/torch.txt" in ln) + 1]
    assert head("Dockerfile.server") == head("Dockerfile.client")


def test_compose_passes_the_build_args_through(compose):
    for name in ("server", "silo-a", "certs"):
        args = compose["services"][name]["build"]["args"]
        assert args == {"BASE_IMAGE": "${CROSSLM_BASE_IMAGE:-python:3.12-slim}",
                        "TORCH_INDEX_URL": "${CROSSLM_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"}


def test_the_lock_subsets_of_the_images_name_packages_of_the_lock():
    import runpy

    lockfile = runpy.run_path(str(ROOT / "scripts" / "lockfile"))
    for name in ("Dockerfile.server", "Dockerfile.client"):
        text = (ROOT / "docker" / name).read_text()
        for lock, flag, names in re.findall(r"lockfile select (?:--lock (\S+) )?--(drop|only) (\S+)", text):
            lockfile["select"](names.split(","), ROOT / (lock or "requirements/lock.txt"), only=flag == "only")
    # the silo's image installs the silo's lock only (tests/test_lock.py: no server package in it)
    client = (ROOT / "docker" / "Dockerfile.client").read_text()
    assert re.findall(r"lockfile select (--lock \S+ )?--", client) == ["--lock requirements/lock-client.txt "] * 2


SERVER_MODULES = ("peft", "gguf", "uvicorn", "starlette", "prometheus_client", "matplotlib", "grpc_health")
BLOCK = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {SERVER_MODULES!r}:
            raise ImportError(f"{{name}} is a server package, not installed in a silo's image")
sys.meta_path.insert(0, Block())
"""


def test_the_client_images_commands_run_without_the_servers_packages(tmp_path):
    """What the client image runs (the daemon, its checks, `crosslm certs`, prepare-demo) imports
    nothing that only `crosslm[server]` installs."""
    import subprocess
    import sys

    script = BLOCK + f"""
import crosslm_client.daemon, crosslm_client.check, crosslm_client.models, crosslm_client.transport
from crosslm_server.experiments.cli import main as crosslm
from crosslm_client.cli import main as client
assert crosslm(["certs", "--out", {str(tmp_path / "certs")!r}, "--silos", "silo-a"]) == 0
assert client(["prepare-demo", "--out", {str(tmp_path / "data")!r}, "--silos", "2", "--n-private", "16",
               "--n-test", "10", "--n-llm-test", "10", "--n-judge", "0"]) == 0
import matplotlib
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert "matplotlib is a server package" in done.stderr, done.stderr[-3000:]  # the blocker works ...
    assert done.stderr.count("Error") == 1, done.stderr[-3000:]  # ... and nothing before it tripped it
    assert (tmp_path / "certs" / "silo-a.pem").is_file() and (tmp_path / "data" / "silo-b.csv").is_file()


@pytest.fixture()
def http_answering():
    """A local HTTP server answering every GET with the status put in `status[0]`."""
    import http.server
    import threading

    status = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status[0])
            self.end_headers()
            self.wfile.write(b'{"ready": false, "reason": "loading the LLM"}')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/readyz", status
    server.shutdown()


def test_the_health_check_says_not_ready_in_one_line_without_a_traceback(http_answering, compose):
    import socket
    import subprocess
    import sys

    assert compose["services"]["server"]["healthcheck"]["test"][:3] == ["CMD", "python", "docker/healthcheck.py"]
    assert "docker/healthcheck.py" in (ROOT / "docker" / "Dockerfile.server").read_text()
    url, status = http_answering
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/readyz"
    probe = [sys.executable, str(ROOT / "docker" / "healthcheck.py")]
    for target, code, said in ((closed, 1, "refused"), (url, 1, "503"), (url, 0, "")):
        status[0] = 503 if said == "503" else 200
        run = subprocess.run([*probe, target], capture_output=True, text=True, timeout=30)
        assert run.returncode == code, run
        assert "Traceback" not in run.stderr and len(run.stderr.splitlines()) == (1 if code else 0), run.stderr
        assert said in run.stderr


def test_the_compose_configs_have_the_examples_shape():
    for name in ("server", *SILOS):
        ours = tomllib.loads((ROOT / "docker" / f"{name}.toml").read_text())
        example = tomllib.loads((ROOT / "examples" / f"{name}.toml").read_text())
        assert set(ours) == set(example), name


def test_the_certs_one_shot_keeps_existing_certificates_on_a_second_up(tmp_path):
    from crosslm_server.experiments.cli import main

    args = ["certs", "--out", str(tmp_path / "certs"), "--server-host", "server", "--silos", "silo-a", "--if-missing"]
    assert main(args) == 0
    ca = (tmp_path / "certs" / "ca.pem").read_bytes()
    assert main(args) == 0 and (tmp_path / "certs" / "ca.pem").read_bytes() == ca
    assert main(args[:-1]) == 2  # without --if-missing an existing CA is refused, as before


def test_the_data_service_cuts_the_counts_of_the_demo_config(compose):
    """prepare-demo takes no engine config: its counts are spelled out in the compose file and
    must stay those of examples/demo.toml, which the server and the report read."""
    from crosslm_server.method.config import load_config

    args = _parser("crosslm-client").parse_args(compose["services"]["data"]["command"][1:])
    cfg = load_config(ROOT / "examples" / "demo.toml")
    split = cfg.split
    assert (args.seed, args.silos, args.n_private, args.n_test, args.n_llm_test, args.n_judge, args.partition,
            args.alpha) == (cfg.seed, split.n_silos, split.n_private, split.n_test, split.n_llm_test, split.n_judge,
                             split.partition, split.alpha)


@pytest.mark.parametrize("silo", SILOS)
def test_each_silo_trains_as_the_demo_config_says(silo):
    """A silo's [train] is the engine config's [round.slm]: what the report calls silo-only."""
    from crosslm_server.method.config import load_config

    train = load_silo_config(ROOT / "docker" / f"{silo}.toml").train
    slm = load_config(ROOT / "examples" / "demo.toml").round.slm
    assert (train.lrs, train.max_epochs, train.continue_epochs, train.batch_size) == \
        (tuple(slm.lrs), slm.max_epochs, slm.max_epochs, slm.batch_size)


# ---- docker-compose.scale.yml: the same demo on PostgreSQL, two front-ends, two workers ----------
@pytest.fixture(scope="module")
def scale() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.scale.yml").read_text())


def test_the_scaled_compose_runs_console_scripts_with_configs_that_load(scale):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    services = scale["services"]
    assert set(services) == {"postgres", "certs", "data", "frontend-a", "frontend-b", "worker-1", "worker-2", *SILOS}
    for name, service in services.items():
        if name == "postgres":
            continue
        command = service["command"]
        assert command[0] in scripts, f"{name}: {command}"
        _parser(command[0]).parse_args(command[1:])
        if "--config" in command:
            assert (ROOT / command[command.index("--config") + 1]).is_file(), name
    for name in ("frontend-a", "frontend-b", "worker-1", "worker-2"):
        command = services[name]["command"]
        config = load_server_config(ROOT / command[command.index("--config") + 1])
        assert config.store.kind == "postgres" and "host=postgres" in config.store.dsn and not config.worker.builtin
        assert services[name]["environment"]["PGPASSWORD"] == services["postgres"]["environment"]["POSTGRES_PASSWORD"]
        assert _mounts(services[name])[str(config.server.data_dir)] == ("server-state", False)  # one shared folder
        port = config.server.http_port if command[1] == "serve" else config.worker.http_port
        check = " ".join(services[name]["healthcheck"]["test"])
        assert check.endswith(f"docker/healthcheck.py http://127.0.0.1:{port}/readyz"), name
        assert services[name]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert [services[f"worker-{i}"]["command"][1] for i in (1, 2)] == ["worker", "worker"]
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]


def test_the_scaled_silos_reach_either_front_end_by_the_certificates_name(scale):
    services = scale["services"]
    certs = services["certs"]["command"]
    host = certs[certs.index("--server-host") + 1]
    for name in ("frontend-a", "frontend-b"):
        assert host in services[name]["networks"]["default"]["aliases"]
    for name in SILOS:
        silo = services[name]
        config = load_silo_config(ROOT / silo["command"][silo["command"].index("--config") + 1])
        assert config.server.address == f"{host}:50051"
        assert {k: v["condition"] for k, v in silo["depends_on"].items()} == {
            "certs": "service_completed_successfully", "data": "service_completed_successfully",
            "frontend-a": "service_healthy", "frontend-b": "service_healthy",
            "worker-1": "service_healthy", "worker-2": "service_healthy"}
    used = {v for s in services.values() for v, _ in _mounts(s).values()}
    assert used == set(scale["volumes"])
