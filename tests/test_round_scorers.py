"""A scorer that goes bad mid-round is dropped with an event; the round scores with the rest."""
import numpy as np
import pytest

from crosslm_server.method.round import usable_scorers
from crosslm_shared.errors import DataError


class Fixed:
    def __init__(self, silo, probs):
        self.info, self.probs, self.calls = {"silo": silo}, np.asarray(probs, dtype=float), 0

    def predict_proba(self, texts):
        self.calls += 1
        return self.probs


def test_non_finite_constant_or_non_probability_scorers_are_dropped_and_named():
    good = Fixed("a", [[0.9, 0.1], [0.2, 0.8]])
    scorers = [good, Fixed("nan", [[np.nan, 0.5], [0.5, 0.5]]), Fixed("flat", [[0.5, 0.5], [0.5, 0.5]]),
               Fixed("raw", [[3.0, -1.0], [0.0, 2.0]])]
    events = []
    kept = usable_scorers(scorers, ["x", "y"], lambda kind, fields: events.append((kind, dict(fields))))
    assert [k.predict_proba(["x", "y"]).tolist() for k in kept] == [good.probs.tolist()]
    assert good.calls == 1  # scored once, the kept probabilities are reused
    assert [(e[1]["silo"], e[1]["reason"]) for e in events] == [
        ("nan", "non-finite outputs"), ("flat", "the same output for every text"),
        ("raw", "outputs are not probabilities")]
    assert all(kind == "scorer_dropped" for kind, _ in events)


def test_a_scorer_flattened_by_its_temperature_but_still_ranking_the_texts_is_kept():
    # measured: a tiny silo SLM calibrated to temperature 20 answered 0.49937 +- 1e-6 (std 9e-7)
    flat_but_ranking = Fixed("hot", [[0.4993732, 0.5006268], [0.4993715, 0.5006285], [0.4993720, 0.5006280]])
    assert len(usable_scorers([flat_but_ranking], ["x", "y", "z"])) == 1


def test_a_round_with_no_usable_scorer_fails_with_a_reason():
    with pytest.raises(DataError, match="unusable outputs"):
        usable_scorers([Fixed("nan", [[np.nan, np.nan]])], ["x"])
