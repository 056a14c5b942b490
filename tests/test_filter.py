import numpy as np

from crosslm_server.method.filter import FilterConfig, dedup, distinct_n, select


def _probs(p_label0):
    p = np.asarray(p_label0, dtype=float)
    return np.stack([p, 1 - p], axis=1)


def test_relative_filter_keeps_top_fraction_of_agreeing_per_label():
    texts = [f"one two three word{i}" for i in range(8)]
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    # label 0: S = .9 .8 .6 .4(disagrees); label 1: S = 1-p = .9 .7 .55 .3(disagrees)
    probs = _probs([0.9, 0.8, 0.6, 0.4, 0.1, 0.3, 0.45, 0.7])
    keep = select(texts, labels, probs, FilterConfig(top_fraction=0.5, balance=False, agreement="argmax"))
    assert keep == [0, 1, 4, 5]


def test_underconfident_scores_still_keep_something():
    """All scores in 0.45-0.57 (as a 128-example MiniLM gives): a fixed 0.7 keeps nothing, q keeps the best."""
    texts = [f"alpha beta gamma {i}" for i in range(6)]
    probs = _probs([0.57, 0.52, 0.51, 0.45, 0.47, 0.49])
    keep = select(texts, [0, 0, 0, 1, 1, 1], probs, FilterConfig(top_fraction=0.34, agreement="argmax"))
    assert keep == [0, 3]
    assert select(texts, [0, 0, 0, 1, 1, 1], probs, FilterConfig(min_score=0.7)) == []


def test_exact_and_near_duplicates_dropped():
    texts = ["the film is great fun", "The film is great fun!", "the film is great fun indeed", "a dull and boring plot"]
    kept = dedup(texts, [0, 1, 2, 3], n=2, threshold=0.5)
    assert kept == [0, 3]


def test_length_bounds_and_balance():
    texts = ["short", "this one is long enough", "also long enough here", "fine length text here", "x"]
    labels = [0, 0, 0, 1, 1]
    probs = _probs([0.9, 0.9, 0.8, 0.1, 0.1])
    keep = select(texts, labels, probs, FilterConfig(top_fraction=1.0, min_words=2))
    assert sorted(keep) == [1, 3]  # "short" and "x" too short; label 0 cut to label 1's count


def test_filter_disabled_keeps_all_in_bounds():
    texts = ["aa bb cc", "dd ee ff", "gg hh ii", "jj kk ll"]
    probs = _probs([0.1, 0.2, 0.9, 0.8])  # all disagree with intended labels
    keep = select(texts, [0, 0, 1, 1], probs, FilterConfig(enabled=False, min_words=1))
    assert sorted(keep) == [0, 1, 2, 3]


def test_distinct_n():
    assert distinct_n(["a b c", "a b c"], 2) == 0.5
    assert distinct_n(["a b", "c d"], 2) == 1.0
    assert distinct_n([], 2) == 0.0


def test_prior_correction_keeps_both_labels_when_the_ensemble_answers_one_label():
    """Label-skewed SLMs: the ensemble says "label 1" for every text (measured on rt-4silo)."""
    texts = [f"word{i} alpha beta" for i in range(8)]
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    probs = _probs([0.42, 0.38, 0.30, 0.35, 0.25, 0.33, 0.40, 0.28])  # S(0|x) < 0.5 everywhere
    assert select(texts, labels, probs, FilterConfig(agreement="argmax")) == []
    keep = select(texts, labels, probs, FilterConfig(agreement="prior_corrected", top_fraction=0.5))
    # mean S(0|.) = 0.34: label 0 keeps 0.42 and 0.38 (S >= mean), label 1 keeps 1-0.25, 1-0.28
    assert keep == [0, 1, 4, 7]
