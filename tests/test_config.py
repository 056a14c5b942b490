import pytest

from crosslm_server.method.config import load_config
from crosslm_shared.errors import ConfigError


def test_examples_load():
    for name in ("smoke", "rt-4silo"):
        cfg = load_config(f"examples/{name}.toml")
        assert cfg.rounds >= 1


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[round.update]\ngama_kl = 0.1\n")
    with pytest.raises(ConfigError, match="gama_kl"):
        load_config(p)


def test_overrides_apply_and_validate():
    cfg = load_config(None, ["round.update.gamma_kl=0", "seed=5", "task=sms_spam"])
    assert cfg.round.update.gamma_kl == 0 and cfg.seed == 5 and cfg.task == "sms_spam"
    with pytest.raises(ConfigError, match="top_fraction"):
        load_config(None, ["round.filter.top_fraction=2"])
    with pytest.raises(ConfigError, match="reward_from"):
        load_config(None, ["round.reward_from=everyone"])
