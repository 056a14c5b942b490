import numpy as np
import pytest

from crosslm_server.reward import reward, standardise_per_label


def test_reward_is_two_s_minus_one():
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5]])
    r = reward(probs, [0, 0, 1])
    assert r == pytest.approx([0.8, -0.4, 0.0])


def test_reward_bounds():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert reward(probs, [0, 0]).tolist() == [1.0, -1.0]


def test_advantage_is_standardised_within_each_label():
    r = np.array([0.01, 0.03, 0.02, 0.5, 0.9])
    labels = [0, 0, 0, 1, 1]
    a = standardise_per_label(r, labels)
    for lab in (0, 1):
        m = np.array(labels) == lab
        assert a[m].mean() == pytest.approx(0.0, abs=1e-9)
        assert a[m].std() == pytest.approx(1.0, abs=1e-6)
    # a spread of 0.02 becomes a unit spread: the generation loss is not drowned by the others
    assert a[1] > a[2] > a[0]


def test_single_sample_or_flat_label_carries_no_preference():
    a = standardise_per_label(np.array([0.3, 0.5, 0.5]), [0, 1, 1])
    assert a.tolist() == [0.0, 0.0, 0.0]
