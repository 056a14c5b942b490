"""`crosslm map`: cells placed by the premise margin, goals judged per cell, results.json keeps
its per-task schema and gains the map."""
import json

import pytest

from crosslm_server.experiments.regime_map import build_map, goals
from crosslm_shared.errors import ConfigError


def _ci(mean, lo, hi):
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "n_pairs": 4}


def _m(v):
    return {"mean": v, "std": 0.0, "n": 1}


def _study(folder, *, silo_only, zerogen, crosslm, llm_before, llm_after, vs_silo, vs_zerogen, task="sms_spam"):
    (folder / "runs" / "crosslm" / "seed-0").mkdir(parents=True)
    (folder / "runs" / "crosslm" / "seed-0" / "report.json").write_text(json.dumps(
        {"config": {"task": task, "rounds": 2, "split": {"n_private": 64}, "eval": {"judge_per_label": 8}}}))
    (folder / "study.json").write_text(json.dumps({
        "task": task, "seeds": [0],
        "arms": {"silo_only": _m(silo_only), "zerogen": _m(zerogen), "crosslm": _m(crosslm)},
        "comparisons": {"crosslm_vs_silo_only": _ci(*vs_silo), "crosslm_vs_zerogen": _ci(*vs_zerogen)},
        "llm": {"crosslm": {"acc_before": _m(llm_before), "acc_after": _m(llm_after), "ppl_before": _m(30.0),
                            "ppl_after": _m(30.3), "on_label_before": _m(0.6), "on_label_after": _m(0.7),
                            "kl_round_1": _m(0.01), "kl_round_2": _m(0.02)}},
        "label_quality": {"crosslm r1": {"truncated_rate": _m(0.02)}, "crosslm r2": {"truncated_rate": _m(0.08)}},
    }))
    return folder


def test_cells_are_placed_by_the_premise_and_judged(tmp_path):
    holds = _study(tmp_path / "a", silo_only=0.90, zerogen=0.91, crosslm=0.93, llm_before=0.80, llm_after=0.87,
                   vs_silo=(3.0, 0.5, 6.0), vs_zerogen=(2.0, 0.2, 4.0))
    fails = _study(tmp_path / "b", silo_only=0.55, zerogen=0.66, crosslm=0.64, llm_before=0.76, llm_after=0.76,
                   vs_silo=(9.0, 5.0, 13.0), vs_zerogen=(-2.0, -5.0, 1.0), task="rotten_tomatoes")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"tasks": {"sms_spam": {"seeds": 3}}}))
    cells = build_map([holds, fails], tmp_path / "map", results=results)
    assert [c["task"] for c in cells] == ["rotten_tomatoes", "sms_spam"]  # by premise margin
    low, high = cells
    assert high["premise_margin"] == pytest.approx(10.0) and low["premise_margin"] == pytest.approx(-21.0)
    # premise holds: the LLM gained 7 of the 6 points needed (30 % of 20 errors), above ZeroGen
    assert high["goals"]["llm_gain_where_premise_holds"] and high["goals"]["above_zerogen_where_premise_holds"]
    assert high["goals"]["above_silo_only"] is None and high["goals"]["truncation_le_5pct"] is False
    # premise fails: those goals do not apply, and 2 points below ZeroGen misses the 1-point floor
    assert low["goals"]["llm_gain_where_premise_holds"] is None and not low["goals"]["not_below_zerogen_by_1"]
    assert low["goals"]["above_silo_only"] and low["truncated_max"] == pytest.approx(8.0)
    merged = json.loads(results.read_text())
    assert merged["tasks"] == {"sms_spam": {"seeds": 3}} and len(merged["map"]) == 2
    assert {p.name for p in (tmp_path / "map").iterdir()} == {"map.json", "map.md", "map.png"}
    assert "**missed**" in (tmp_path / "map" / "map.md").read_text()


def test_an_llm_that_did_not_learn_misses_where_the_premise_holds(tmp_path):
    cell = {"llm_raw": [80.0, 81.0], "premise_margin": 10.0, "perplexity": [30.0, 30.0], "silo_only": 90.0,
            "gain_vs_zerogen": {"mean": 0.5, "ci_low": -1.0}, "gain_vs_silo_only": {"ci_low": 1.0},
            "truncated_max": None}
    g = goals(cell)
    assert g["llm_gain_where_premise_holds"] is False and g["above_zerogen_where_premise_holds"] is False


def test_a_folder_without_a_study_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no study.json"):
        build_map([tmp_path], tmp_path / "map")
