import numpy as np
import pytest

from crosslm_server.method.enhance import EnhanceConfig, targets
from crosslm_shared.errors import ConfigError

PROBS = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])


def test_hard_labels_are_the_default_and_are_the_intended_labels():
    assert EnhanceConfig().labels == "hard"
    np.testing.assert_array_equal(targets([0, 1, 1], PROBS, EnhanceConfig()), [[1, 0], [0, 1], [0, 1]])


def test_soft_labels_mix_the_intended_label_with_the_scorers():
    t = targets([0, 1, 1], PROBS, EnhanceConfig(labels="soft", soft_mix=0.5))
    np.testing.assert_allclose(t, [[0.95, 0.05], [0.15, 0.85], [0.3, 0.7]])
    np.testing.assert_allclose(t.sum(1), 1.0)
    # mix 0: the scorers alone, whatever label was asked for
    np.testing.assert_allclose(targets([1, 0, 1], PROBS, EnhanceConfig(labels="soft", soft_mix=0.0)), PROBS)


@pytest.mark.parametrize("kw", [{"labels": "fuzzy"}, {"soft_mix": 1.5}, {"soft_mix": -0.1}])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ConfigError):
        EnhanceConfig(**kw)
