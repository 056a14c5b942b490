import json
from pathlib import Path

import numpy as np
import pytest

from crosslm_server.experiments.cli import main
from crosslm_server.method.config import load_config
from crosslm_server.experiments.stats import mean_std, paired_bootstrap
from crosslm_server.experiments.study import ABLATIONS, run_study
from crosslm_shared.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["examples/rt-4silo.toml", "examples/sms-4silo.toml"]


def test_paired_bootstrap_interval_contains_mean_and_detects_a_shift():
    a = [0.70, 0.72, 0.75, 0.71, 0.69, 0.74]
    b = [0.60, 0.65, 0.66, 0.60, 0.61, 0.63]
    c = paired_bootstrap(a, b)
    assert c["ci_low"] <= c["mean"] <= c["ci_high"]
    assert c["ci_low"] > 0 and c["n_pairs"] == 6
    flat = paired_bootstrap([0.5, 0.6, 0.4], [0.6, 0.5, 0.4])
    assert flat["ci_low"] < 0 < flat["ci_high"]


def test_mean_std():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "n": 2}


def test_study_runs_arms_resumes_and_writes_outputs(tmp_path, tiny_sim_config):
    out = tmp_path / "study"
    args = ["study", "--config", str(tiny_sim_config), "--out", str(out), "--seeds", "2", "--arms", "crosslm,no_kl",
            "--set", "rounds=1"]
    assert main(args) == 0
    summary = json.loads((out / "study.json").read_text())
    assert set(summary["arms"]) == {"silo_only", "zerogen", "crosslm", "no_kl"}
    assert summary["arms"]["crosslm"]["n"] == 2
    assert "crosslm_vs_silo_only" in summary["comparisons"] and "crosslm_vs_no_kl" in summary["comparisons"]
    assert (out / "study.md").exists() and (out / "study_arms.png").exists() and (out / "study_rounds.png").exists()
    # the gate's record: one decision per silo and round and seed, and ZeroGen's per silo and seed
    n_silos = len(json.loads((out / "runs" / "crosslm" / "seed-0" / "report.json").read_text())["silos"])
    gate = summary["gate"]
    assert gate["crosslm"]["decisions"] == gate["no_kl"]["decisions"] == gate["zerogen"]["decisions"] == 2 * n_silos
    assert 0 <= gate["crosslm"]["refused"] <= 2 * n_silos
    assert "keep-if-better gate" in (out / "study.md").read_text()
    # the judge's view of the synthetic data, per arm and round and for ZeroGen
    quality = summary["label_quality"]
    assert {"crosslm r1", "no_kl r1", "zerogen"} <= set(quality)
    for q in quality.values():
        assert 0 <= q["judge_on_label"]["mean"] <= 1 and q["judge_on_label"]["n"] == 2
        assert 0 <= q["truncated_rate"]["mean"] <= 1 and q["truncated_rate"]["n"] == 2  # hit the token cap
    assert "Label quality of the synthetic data" in (out / "study.md").read_text()
    # each ablation beside the protocol on the same seeds
    row = summary["ablations"]["no_kl"]
    assert row["seeds"] == [0, 1] and set(summary["ablations"]) == {"no_kl"}
    assert row["protocol"]["slm"] == pytest.approx(summary["arms"]["crosslm"]["mean"])
    assert row["arm"]["slm"] == pytest.approx(summary["arms"]["no_kl"]["mean"])
    assert row["protocol"]["llm_acc_after"] == pytest.approx(summary["llm"]["crosslm"]["acc_after"]["mean"])
    assert "Each arm against the protocol" in (out / "study.md").read_text()
    assert summary["llm"]["crosslm"]["balanced_acc_after"]["n"] == 2 and "balanced accuracy" in (out / "study.md").read_text()
    # the baselines are computed once per seed and shared by the arms
    assert len(list((out / "cache").glob("zerogen-*.json"))) == 2
    # resumable: a finished (arm, seed) is not run again
    report = out / "runs" / "no_kl" / "seed-1" / "report.json"
    stamp = report.stat().st_mtime_ns
    report_0 = out / "runs" / "no_kl" / "seed-0" / "report.json"
    report_0.unlink()
    # --summary-only runs nothing and summarises what has finished: no_kl now has one seed
    assert main([*args, "--summary-only"]) == 0
    assert not report_0.exists()
    one_seed = json.loads((out / "study.json").read_text())
    assert one_seed["arms"]["no_kl"]["n"] == 1 and one_seed["ablations"]["no_kl"]["seeds"] == [1]
    assert main(args) == 0
    assert report.stat().st_mtime_ns == stamp and report_0.exists()
    # the headline figures docs/results.json keeps, merged per task
    head = json.loads((out / "study.json").read_text())["headline"]
    assert head["seeds"] == 2 and set(head["slm_gain_vs_silo_only"]) == {"mean", "ci_low", "ci_high"}
    assert 0 <= head["llm_acc_after"] <= 1 and head["ppl_before"] > 0
    results = tmp_path / "results.json"
    assert main(["results", str(out), "--out", str(results)]) == 0
    merged = json.loads(results.read_text())["tasks"]
    assert list(merged) == [json.loads((out / "study.json").read_text())["task"]]
    assert merged[list(merged)[0]]["slm_gain_vs_zerogen"] == head["slm_gain_vs_zerogen"]


def test_auc_and_label_quality_measure_what_they_say():
    from crosslm_server.method.evaluate import auc

    hits = np.array([True, True, False, False])
    assert auc(np.array([0.9, 0.8, 0.1, 0.2]), hits) == 1.0
    assert auc(np.array([0.1, 0.2, 0.9, 0.8]), hits) == 0.0
    assert auc(np.array([0.5, 0.5, 0.5, 0.5]), hits) == 0.5
    assert np.isnan(auc(np.array([0.1, 0.2]), np.array([True, True])))


def test_balanced_accuracy_does_not_reward_a_constant_answer():
    from crosslm_server.method.evaluate import balanced_accuracy

    labels = [0] * 9 + [1]
    assert balanced_accuracy([0] * 10, labels) == 0.5  # raw accuracy 0.9
    assert balanced_accuracy(labels, labels) == 1.0
    assert balanced_accuracy([1] * 9 + [0], labels) == 0.0


def test_a_study_with_the_llm_filter_shares_the_baselines_cache(tmp_path, tiny_sim_config):
    """`--set round.filter.llm_weight=...` in a second study: silo-only SLMs come from the first
    study's cache; ZeroGen, whose filter changed, is computed again with the same filter."""
    first, second = tmp_path / "a", tmp_path / "b"
    base = ["study", "--config", str(tiny_sim_config), "--seeds", "1", "--arms", "crosslm", "--set", "rounds=1"]
    assert main([*base, "--out", str(first)]) == 0
    cache = first / "cache"
    before = {p.name for p in cache.iterdir()}
    assert main([*base, "--out", str(second), "--cache", str(cache), "--set", "round.filter.llm_weight=auto"]) == 0
    added = {p.name for p in cache.iterdir()} - before
    assert not (second / "cache").exists()
    assert len(added) == 1 and next(iter(added)).startswith("zerogen-")
    a = json.loads((first / "runs/crosslm/seed-0/report.json").read_text())
    b = json.loads((second / "runs/crosslm/seed-0/report.json").read_text())
    assert b["config"]["round"]["filter"]["llm_weight"] == "auto"
    # the weight each batch got is on record, for CrossLM's submissions and ZeroGen's one batch
    weights = [s["llm_weight"] for r in b["rounds"] for s in r["silos"].values()]
    assert weights and all(0 <= w <= 1 for w in [*weights, b["baselines"]["zerogen"]["llm_weight"]])
    quality = json.loads((second / "study.json").read_text())["label_quality"]
    assert quality["crosslm r1"]["llm_weight"]["mean"] == pytest.approx(np.mean(weights))
    assert [s["acc_local"] for s in a["silos"].values()] == [s["acc_local"] for s in b["silos"].values()]


def test_the_llm_filter_arm_is_compared_with_a_zerogen_that_filters_the_same_way(tmp_path, tiny_sim_config):
    """with_llm_filter changes ZeroGen's filter too, so the arm runs its own ZeroGen and the study
    compares the two; a run finished before that gets only the baseline added, not redone."""
    out = tmp_path / "study"
    args = ["study", "--config", str(tiny_sim_config), "--out", str(out), "--seeds", "1",
            "--arms", "crosslm,with_llm_filter", "--set", "rounds=1"]
    assert main(args) == 0
    summary = json.loads((out / "study.json").read_text())
    assert summary["arms"]["zerogen_with_llm_filter"]["n"] == 1
    assert "with_llm_filter_vs_zerogen_with_llm_filter" in summary["comparisons"]
    # CrossLM against every ZeroGen of the study; its headline against the strongest
    assert "crosslm_vs_zerogen_with_llm_filter" in summary["comparisons"]
    zerogens = {a: summary["arms"][a]["mean"] for a in ("zerogen", "zerogen_with_llm_filter")}
    best = max(zerogens, key=zerogens.get)
    assert summary["headline"]["slm_gain_vs_zerogen"]["mean"] == summary["comparisons"][f"crosslm_vs_{best}"]["mean"]
    assert "zerogen_with_llm_filter" in summary["label_quality"] and "zerogen_with_llm_filter" in summary["gate"]
    assert len(list((out / "cache").glob("zerogen-*.json"))) == 2  # the SLM filter's and the LLM filter's
    report = out / "runs" / "with_llm_filter" / "seed-0" / "report.json"
    rep = json.loads(report.read_text())
    own = rep["baselines"].pop("zerogen")
    report.write_text(json.dumps(rep))
    assert main(args) == 0
    rep = json.loads(report.read_text())
    assert rep["baselines"]["zerogen"] == own and rep["rounds"]  # the rounds were kept, not rerun
    assert "## Plots" in (report.parent / "report.md").read_text()


def test_a_finished_run_with_another_configuration_is_not_reused(tmp_path, tiny_sim_config):
    """After a default or the config file changes, the study must not pass old runs off as the
    new protocol: it stops and names what differs."""
    out = tmp_path / "study"
    args = ["study", "--config", str(tiny_sim_config), "--out", str(out), "--seeds", "1", "--set", "rounds=1"]
    assert main(args) == 0
    report = out / "runs" / "crosslm" / "seed-0" / "report.json"
    stamp = report.stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"round.update.gamma_kl: 0.1 then, 0.5 now"):
        run_study(str(tiny_sim_config), out, seeds=[0], arms=["crosslm"],
                  overrides=["rounds=1", "round.update.gamma_kl=0.5"])
    assert report.stat().st_mtime_ns == stamp  # nothing lost
    # an option the old report lacks (added since, with a default that keeps the old behaviour) passes
    rep = json.loads(report.read_text())
    del rep["config"]["round"]["update"]["gamma_kl"]
    report.write_text(json.dumps(rep))
    run_study(str(tiny_sim_config), out, seeds=[0], arms=["crosslm"], overrides=["rounds=1", "round.update.gamma_kl=0.5"])


def test_the_final_sync_hands_every_silo_the_whole_pool(tmp_path, tiny_sim_config):
    """After the last round each silo takes every pooled example once more, as ZeroGen's silos take
    its whole set; the arm's own ZeroGen is the automatic weight's (the sync does not change it)."""
    out = tmp_path / "study"
    assert main(["study", "--config", str(tiny_sim_config), "--out", str(out), "--seeds", "1", "--set", "rounds=1",
                 "--arms", "with_auto_llm_filter_prior_anchor,with_auto_llm_filter_prior_anchor_sync"]) == 0
    rep = json.loads((out / "runs" / "with_auto_llm_filter_prior_anchor_sync" / "seed-0" / "report.json").read_text())
    pooled = sum(s["kept"] for r in rep["rounds"] for s in r["silos"].values())
    for s in rep["silos"].values():
        assert s["sync"]["n_synthetic"] == pooled and s["acc_final"] == s["sync"]["acc"]
        # the gate: the synced SLM is kept only if better on validation, else the last round's stays
        assert s["sync"]["adopted"] or s["acc_final"] == pytest.approx(s["acc_after"][-1])
    summary = json.loads((out / "study.json").read_text())
    assert "with_auto_llm_filter_prior_anchor_sync_vs_with_auto_llm_filter_prior_anchor_before_sync" in summary["comparisons"]
    assert summary["arms"]["with_auto_llm_filter_prior_anchor_before_sync"]["mean"] == pytest.approx(
        np.mean([s["acc_after"][-1] for s in rep["silos"].values()]))
    for name, s in rep["silos"].items():  # the study counts the synced figure, not the last round's
        assert summary["per_silo"][name]["with_auto_llm_filter_prior_anchor_sync"]["mean"] == pytest.approx(s["acc_final"])
    assert "final pool sync" in (out / "runs" / "with_auto_llm_filter_prior_anchor_sync" / "seed-0" / "report.md").read_text()
    assert len(list((out / "cache").glob("zerogen-*.json"))) == 2  # the SLM filter's and the automatic weight's
    # the same protocol as a study's own default (--set for every arm): its crosslm arm is compared with its
    # last round too, and the finished runs move in unchanged (same configuration)
    proto = tmp_path / "protocol"
    (proto / "runs" / "crosslm").mkdir(parents=True)
    (out / "runs" / "with_auto_llm_filter_prior_anchor_sync" / "seed-0").rename(proto / "runs" / "crosslm" / "seed-0")
    assert main(["study", "--config", str(tiny_sim_config), "--out", str(proto), "--seeds", "1", "--set", "rounds=1",
                 "--set", 'round.filter.llm_weight="auto"', "--set", "round.update.gamma_prior=1.0",
                 "--set", "final_sync=true", "--cache", str(out / "cache")]) == 0  # runs nothing: done
    assert "crosslm_vs_crosslm_before_sync" in json.loads((proto / "study.json").read_text())["comparisons"]


def test_a_final_sync_without_the_pool_is_refused(tiny_sim_config):
    with pytest.raises(ConfigError, match="final_sync = true needs synthetic_pool"):
        load_config(str(tiny_sim_config), ["final_sync=true", "synthetic_pool=false"])


def test_a_run_is_the_same_whether_its_baselines_came_from_the_cache(tmp_path, tiny_sim_config):
    """The rounds must not depend on the cache's state: computing the baselines draws from
    torch's generator, reading them does not."""
    from crosslm_server.experiments.simulate import simulate

    cfg = load_config(str(tiny_sim_config), ["rounds=1"])
    cold = simulate(cfg, tmp_path / "cold", cache_dir=tmp_path / "cache")
    warm = simulate(cfg, tmp_path / "warm", cache_dir=tmp_path / "cache")
    assert [s["acc_after"] for s in cold["silos"].values()] == [s["acc_after"] for s in warm["silos"].values()]
    assert cold["rounds"][0]["kl"] == warm["rounds"][0]["kl"]
    assert cold["llm"]["acc_after"] == warm["llm"]["acc_after"]


def test_a_run_another_study_process_holds_is_left_to_it(tmp_path, tiny_sim_config, caplog):
    fcntl = pytest.importorskip("fcntl")  # POSIX: elsewhere each study process runs every missing pair

    out = tmp_path / "study"
    args = ["study", "--config", str(tiny_sim_config), "--out", str(out), "--seeds", "1", "--arms", "crosslm,no_kl",
            "--set", "rounds=1"]
    lock = out / "runs" / "no_kl" / "seed-0.study-lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as held:  # another process running no_kl seed 0 (flock: per open file)
        held.write("pid 4242 on elsewhere")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with caplog.at_level("INFO", logger="crosslm_server.experiments.study"):
            assert main(args) == 0
    assert (out / "runs" / "crosslm" / "seed-0" / "report.json").exists()
    assert not (out / "runs" / "no_kl" / "seed-0" / "report.json").exists()
    assert "no_kl seed 0 is running in another process (pid 4242 on elsewhere)" in caplog.text
    assert json.loads((out / "study.json").read_text())["arms"]["crosslm"]["n"] == 1
    # the holder gone (killed: the OS drops its lock), the next study runs it and leaves no lock behind
    assert main(args) == 0
    assert (out / "runs" / "no_kl" / "seed-0" / "report.json").exists()
    assert not list(out.rglob("*.study-lock"))


@pytest.mark.parametrize("config", EXAMPLES)
@pytest.mark.parametrize("arm", sorted(ABLATIONS))
def test_every_arm_loads_on_the_example_configs(arm, config):
    """A typo in an arm's overrides would surface only hours into a study; here it fails at once."""
    load_config(ROOT / config, ABLATIONS[arm])


@pytest.mark.parametrize("config", EXAMPLES)
def test_the_weak_prior_anchor_arm_weakens_the_anchor(config):
    weak = load_config(ROOT / config, ABLATIONS["weak_prior_anchor"])
    assert weak.round.update.gamma_prior == pytest.approx(0.3)
    assert load_config(ROOT / config).round.update.gamma_prior > weak.round.update.gamma_prior
