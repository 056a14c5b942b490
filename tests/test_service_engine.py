"""The engine registry and what the server does when an engine cannot load."""
import json
import time

import pytest

from crosslm_server.engines import api as engine_api
from crosslm_server.engines.api import Engine, create_engine
from fakes.tiny_engine import TinyEngine
from crosslm_shared.errors import ConfigError
from service_helpers import http_get, server_config, start_server


def test_the_registry_ships_the_real_engine_and_test_engines_load_by_import_path():
    assert engine_api.ENGINES == {"crosslm": "crosslm_server.engines.crosslm:CrossLMEngine"}
    engine = create_engine("fakes.tiny_engine:TinyEngine", {"steps": 1})
    assert isinstance(engine, TinyEngine) and isinstance(engine, Engine) and engine.ready()
    assert create_engine("fakes.echo_engine:EchoEngine").ready()


def test_unknown_or_unimportable_engines_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match=r"\[engine\] name='gpt9' is unknown; choose one of"):
        create_engine("gpt9")
    with pytest.raises(ConfigError, match="cannot be imported"):
        create_engine("fakes.no_such_module:Engine")
    monkeypatch.setitem(engine_api.ENGINES, "broken", "crosslm_server.no_such_module:Engine")
    with pytest.raises(ConfigError, match="cannot be imported"):
        create_engine("broken")


def test_an_engine_that_fails_to_load_keeps_the_server_unready(tmp_path):
    def explode():
        raise RuntimeError("no GPU memory left")

    s = start_server(server_config(tmp_path / "srv"), engine_factory=explode)
    try:
        for _ in range(100):
            status, body = http_get(s, "/readyz")
            if "failed" in body:
                break
        assert status == 503
        assert json.loads(body)["reason"] == "engine failed to load: RuntimeError: no GPU memory left"
        assert http_get(s, "/healthz")[0] == 200
    finally:
        s.stop(grace=0.5)


def test_an_llm_that_fails_to_load_in_the_background_says_so_on_readyz(tmp_path, tiny_sim_config, toy_task_path):
    """The crosslm engine loads its LLM in a thread; a failure there must not read 'loading' forever."""
    tiny_sim_config.write_text(tiny_sim_config.read_text().replace('[llm]\nmodel = "', '[llm]\nmodel = "/no/such'))
    options = {"config": str(tiny_sim_config), "tasks": [str(toy_task_path)], "adapters_dir": str(tmp_path / "a")}
    s = start_server(server_config(tmp_path / "srv"), engine_factory=lambda: create_engine("crosslm", options))
    try:
        for _ in range(200):
            status, body = http_get(s, "/readyz")
            if "failed" in body:
                break
            time.sleep(0.05)
        assert status == 503 and json.loads(body)["reason"].startswith("engine failed to load: LLM failed to load")
    finally:
        s.stop(grace=0.5)


def test_an_unwritable_store_makes_the_server_unready(tmp_path, monkeypatch):
    from crosslm_shared.errors import PreconditionError

    s = start_server(server_config(tmp_path / "srv"))
    try:
        for _ in range(100):
            if http_get(s, "/readyz")[0] == 200:
                break
        def refuse():
            raise PreconditionError("store 'state.db' is not writable: disk I/O error")
        monkeypatch.setattr(s.store, "check_writable", refuse)
        status, body = http_get(s, "/readyz")
        assert status == 503 and "not writable" in json.loads(body)["reason"]
    finally:
        s.stop(grace=0.5)
