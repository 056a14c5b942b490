"""`crosslm simulate` end to end on tiny random models: every step runs, the report is complete."""

import json

from crosslm_server.experiments.cli import main
from crosslm_server.experiments.report import check_schema


def test_simulate_tiny_writes_complete_report(tmp_path, tiny_sim_config):
    cfg = tiny_sim_config
    out = tmp_path / "out"
    assert main(["simulate", "--config", str(cfg), "--out", str(out), "--seed", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert check_schema(report) == []
    assert report["seed"] == 3
    assert all(len(s["acc_after"]) == 2 for s in report["silos"].values())
    assert set(report["baselines"]["zerogen"]["silos"]) == set(report["silos"])
    rnd = report["rounds"][0]
    # the continued model's test accuracy is on record, kept or not; a kept one is the silo's
    for arm in (rnd["silos"].values(), report["baselines"]["zerogen"]["silos"].values()):
        for s in arm:
            assert 0.0 <= s["acc_returned"] <= 1.0
            assert not s["adopted"] or s["acc_returned"] == s["acc"]
    assert rnd["generated"] == 2 * 4 * 3  # silos × per_label × labels
    # truncation: texts that hit the cap, of every text generated, per silo, per round and for ZeroGen
    assert rnd["truncated_rate"] == rnd["truncated"] / rnd["generated"]
    for s in rnd["silos"].values():
        assert s["truncated_rate"] == s["truncated"] / s["generated"] and s["max_new_tokens"] == 12
        assert sum(s[f"end_{e}"] for e in ("close", "newline", "sentence", "eos", "cap")) == s["generated"]
    assert 0 <= report["baselines"]["zerogen"]["truncated_rate"] <= 1
    assert f"| {rnd['truncated']} ({100 * rnd['truncated_rate']:.1f} %) |" in (out / "report.md").read_text()
    assert set(rnd["seconds_per_stage"]) == {"generate", "score", "filter", "update_llm", "enhance_slm"}
    assert (out / "adapters" / "round-2" / "adapter_model.safetensors").exists()
    assert "ZeroGen" in (out / "report.md").read_text()
    assert 0 <= report["llm"]["balanced_acc_before"] <= 1 and 0 <= report["llm"]["balanced_acc_after"] <= 1
    assert "zero-shot balanced accuracy" in (out / "report.md").read_text()


def test_check_schema_names_missing_keys():
    assert "llm.ppl_after" in check_schema({"silos": {"a": {"arch": "x", "n_private": 1, "acc_local": 0.5,
                                                             "acc_after": []}}, "llm": {}, "rounds": []})


def test_a_cached_llm_measurement_without_balanced_accuracy_gets_it(tmp_path, tiny_sim_config):
    """LLM 'before' figures cached before balanced accuracy existed: the run measures it."""
    cache, args = tmp_path / "cache", ["simulate", "--config", str(tiny_sim_config), "--set", "rounds=1"]
    assert main([*args, "--out", str(tmp_path / "a"), "--cache", str(cache)]) == 0
    (cached,) = cache.glob("llm-before-*.json")
    before = json.loads(cached.read_text())
    cached.write_text(json.dumps({k: v for k, v in before.items() if k != "balanced_acc"}))
    assert main([*args, "--out", str(tmp_path / "b"), "--cache", str(cache)]) == 0
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["llm"]["balanced_acc_before"] == before["balanced_acc"]
    assert json.loads(cached.read_text()) == before  # completed in the cache, not measured again next run


def test_a_config_without_a_judge_pool_runs_and_reports_the_judge_figures_as_nan(tmp_path, tiny_sim_config):
    """examples/demo.toml has `n_judge = 0` (the demo needs no judge); simulate must still run it."""
    import math

    out = tmp_path / "out"
    assert main(["simulate", "--config", str(tiny_sim_config), "--out", str(out), "--rounds", "1",
                 "--set", "split.n_judge=0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert check_schema(report) == []
    assert all(math.isnan(s["judge_on_label"]) for s in report["rounds"][0]["silos"].values())
    assert math.isnan(report["llm"]["on_label_before"])


def test_simulate_with_dp_charges_each_silo_and_reports_epsilon(tmp_path, tiny_sim_config):
    """`privacy.enabled`: every silo's silo-only SLM and each round's continuation are DP-SGD,
    one budget per silo, spent to ε over 1 + rounds trainings; the report states it."""
    out = tmp_path / "out"
    args = ["simulate", "--config", str(tiny_sim_config), "--out", str(out), "--rounds", "1", "--set", "zerogen=false",
            "--set", "privacy.enabled=true", "--set", "privacy.epsilon=4.0"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    for s in report["silos"].values():
        assert s["privacy"]["trainings"] == 2 and abs(s["privacy"]["epsilon"] - 4.0) < 0.1
        assert s["local_selection"]["privacy"]["epsilon"] < s["privacy"]["epsilon"]
    assert all(0 < r["epsilon"] <= 4.0 + 1e-6 for r in report["rounds"][0]["silos"].values())
    assert "DP-SGD on the private records" in (out / "report.md").read_text()
    # ZeroGen's arm is not DP-accounted: with DP on it must be switched off
    assert main(["simulate", "--config", str(tiny_sim_config), "--out", str(tmp_path / "zg"), "--rounds", "1",
                 "--set", "privacy.enabled=true"]) == 2
