"""The hand-written statistics the study and the filter use, checked against the kept libraries on
the same numbers (scipy's bootstrap, scikit-learn's ROC AUC): the server keeps no scipy or
scikit-learn dependency for two small functions, but their answers must be the libraries'."""
import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from crosslm_server.experiments.stats import paired_bootstrap
from crosslm_server.method.reward import auc


@pytest.mark.parametrize("seed", range(5))
def test_auc_is_sklearns_with_ties(seed):
    rng = np.random.default_rng(seed)
    score = rng.integers(0, 6, size=200).astype(float)  # many ties
    positive = rng.random(200) < 0.3 + 0.05 * score
    assert auc(score, positive) == pytest.approx(roc_auc_score(positive, score), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_paired_bootstrap_interval_is_scipys(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(70, 6, size=24)
    b = a - rng.normal(2.0, 4.0, size=24)  # paired: a silo under one seed, two arms
    ours = paired_bootstrap(a, b, n_boot=20_000, seed=seed)
    ref = stats.bootstrap((a - b,), np.mean, n_resamples=20_000, method="percentile", confidence_level=0.95,
                          rng=np.random.default_rng(seed + 100))
    assert ours["mean"] == pytest.approx(float(np.mean(a - b)))
    width = ref.confidence_interval.high - ref.confidence_interval.low
    # two Monte-Carlo estimates of the same quantiles: they agree to a few percent of the width
    assert ours["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=0.05 * width)
    assert ours["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=0.05 * width)
