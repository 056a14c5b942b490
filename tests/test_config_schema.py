"""One config system (crosslm_shared.schema): every file's keys declared once, with their help;
unknown keys, wrong types and old names handled the same way in every file; docs/config.md
generated from the same declarations."""
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from crosslm_client.config import load_silo_config
from crosslm_server.method.config import load_config, load_engine_config
from crosslm_server.service.config import load_server_config
from crosslm_shared.errors import ConfigError
from crosslm_shared.schema import option

ROOT = Path(__file__).resolve().parents[1]
SILO = '''[silo]
name = "silo-a"
labels = ["negative", "positive"]
data = "private/a.csv"
[server]
plaintext_dev_mode = true
'''


def _silo(tmp_path, extra: str = "") -> Path:
    path = tmp_path / "silo.toml"
    path.write_text(SILO + extra)
    return path


def test_paths_resolve_against_the_files_folder(tmp_path):
    cfg = load_silo_config(_silo(tmp_path))
    assert cfg.silo.data == tmp_path / "private" / "a.csv"
    server = tmp_path / "s.toml"
    server.write_text('[server]\ndata_dir = "state"\n[store]\npath = "db/x.db"\n')
    loaded = load_server_config(server)
    assert loaded.server.data_dir == tmp_path / "state" and loaded.store.path == tmp_path / "db" / "x.db"


@pytest.mark.parametrize("loader, text, where", [
    ("silo", "[train]\nlearning_rate = 0.1\n", r"\[train\] has unknown key\(s\) \['learning_rate'\]"),
    ("silo", "[silo2]\nname = 1\n", r"\[top level\] has unknown key\(s\) \['silo2'\]"),
    ("server", "[server]\ngrpc_prot = 1\n", r"\[server\] has unknown key\(s\) \['grpc_prot'\]"),
    ("engine", "[round.filter]\ntop_frac = 1\n", r"\[round.filter\] has unknown key\(s\) \['top_frac'\]"),
])
def test_an_unknown_key_is_named_with_its_section(tmp_path, loader, text, where):
    path = tmp_path / "c.toml"
    path.write_text((SILO if loader == "silo" else "") + text)
    load = {"silo": load_silo_config, "server": load_server_config, "engine": load_engine_config}[loader]
    with pytest.raises(ConfigError, match=where):
        load(path)


@pytest.mark.parametrize("text, match", [
    ('[server]\ngrpc_port = "50051"\n', r"\[server\] grpc_port = '50051': expected integer \(gRPC port"),
    ("[server]\nplaintext_dev_mode = 1\n", r"plaintext_dev_mode = 1: expected true or false"),
    ('[store]\nkind = "postgre"\n', r"\[store\] kind = 'postgre': expected one of 'sqlite', 'memory'"),
])
def test_a_value_of_the_wrong_type_is_refused_at_load(tmp_path, text, match):
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_server_config(path)


def test_a_list_of_the_wrong_items_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"\[train\] lrs = \['fast'\]: expected list of number"):
        load_silo_config(_silo(tmp_path, '[train]\nlrs = ["fast"]\n'))


def test_the_silo_trains_with_every_shared_setting(tmp_path):
    """[train] is the shared SLMTrainConfig: a key the daemon dropped before (select_metric,
    head_lr_mult) reaches the training now."""
    cfg = load_silo_config(_silo(tmp_path, '[train]\nmax_epochs = 2\nhead_lr_mult = 5.0\n'
                                           'select_metric = "accuracy"\ncontinue_epochs = 0\n'))
    train = cfg.train.slm_config(seed=7)
    assert (train.max_epochs, train.head_lr_mult, train.select_metric, train.seed) == (2, 5.0, "accuracy", 7)
    assert cfg.train.slm_config(seed=7, epochs=1).max_epochs == 1
    assert type(train).__name__ == "SLMTrainConfig" and not hasattr(train, "continue_epochs")


def test_an_old_key_is_read_for_one_release_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        cfg = load_silo_config(_silo(tmp_path, "[train]\nepochs = 2\n"))
    assert cfg.train.max_epochs == 2
    assert "[train] epochs is now max_epochs" in caplog.text
    with pytest.raises(ConfigError, match="sets both epochs and max_epochs"):
        load_silo_config(_silo(tmp_path, "[train]\nepochs = 2\nmax_epochs = 3\n"))


def test_a_missing_required_section_says_what_it_needs(tmp_path):
    path = tmp_path / "silo.toml"
    path.write_text("[server]\nplaintext_dev_mode = true\n")
    with pytest.raises(ConfigError, match=r"\[silo\] name"):
        load_silo_config(path)


def test_the_server_names_what_it_does_not_use_of_a_simulate_config(caplog):
    with caplog.at_level(logging.INFO):
        cfg = load_engine_config(ROOT / "examples" / "rt-4silo.toml")
    assert cfg.round == load_config(ROOT / "examples" / "rt-4silo.toml").round
    assert "archs, rounds, seed, split do not apply to the server" in caplog.text


def test_every_option_carries_its_help():
    with pytest.raises(TypeError, match="help"):
        @dataclass(frozen=True)
        class Bad:
            x: int = option(1)


def test_the_config_reference_is_generated_from_the_declarations():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_docs.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (ROOT / "docs" / "config.md").read_text()
    for key in ("`grpc_port`", "`continue_epochs`", "`llm_weight`", "`n_private`", "`epochs` → `max_epochs`"):
        assert key in text
