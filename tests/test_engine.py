"""The real engine class (CrossLMEngine) on tiny models, through the worker's contract."""

import pytest

from crosslm_server.engines.api import RoundOutcome, RoundRequest, create_engine
from crosslm_shared.slm import load_slm, new_slm
from crosslm_shared.tasks import load_task


@pytest.fixture()
def engine_setup(tmp_path, tiny_sim_config, tiny_slm_dir, toy_task_path):
    task = load_task(toy_task_path)
    slm_dir = new_slm(str(tiny_slm_dir), task.label_names).save(tmp_path / "submitted")
    engine = create_engine("crosslm", {"config": str(tiny_sim_config), "tasks": [str(toy_task_path)],
                                       "adapters_dir": str(tmp_path / "adapters"), "background": False})
    return engine, task, slm_dir


def _request(tmp_path, slm_dir, sid="sub-1", task="toy"):
    work = tmp_path / f"work-{sid}"
    work.mkdir()
    return RoundRequest(submission_id=sid, silo="a", task=task, slm_dir=slm_dir,
                        peer_slm_dirs={"a": slm_dir}, work_dir=work)


def committed(engine, request, emit=lambda *_: None) -> RoundOutcome:
    """What the worker does when a round succeeds: run it, then publish it (`commit`)."""
    out = engine.run_round(request, emit)
    return RoundOutcome(out.slm_dir, dict(out.metrics) | engine.commit(request, out))


def test_round_returns_enhanced_slm_and_saves_one_adapter_version(tmp_path, engine_setup):
    engine, task, slm_dir = engine_setup
    assert engine.ready()
    events = []
    request = _request(tmp_path, slm_dir)
    out = engine.run_round(request, lambda kind, fields: events.append(kind))
    assert engine.adapters.versions() == []  # nothing is published before the round succeeded
    out = RoundOutcome(out.slm_dir, dict(out.metrics) | engine.commit(request, out))
    assert load_slm(out.slm_dir).labels == task.label_names
    assert {"generating", "scoring", "training_llm", "training_slm"} <= set(events)
    assert out.metrics["adapter_version"] == 1 and out.metrics["generated"] > 0
    # the same submission again (a rerun after a crash): the adapter is not updated twice
    rerun = RoundRequest("sub-1", "a", "toy", slm_dir, {"a": slm_dir}, tmp_path / "work-rerun")
    again = committed(engine, rerun)
    assert "adapter_version" not in again.metrics
    assert [v.version for v in engine.adapters.versions()] == [1]
    # the synthetic pool comes back with the SLM; the rerun did not add its examples twice
    from crosslm_shared.bundle import SYNTHETIC_FILE, read_synthetic

    first, _ = read_synthetic(out.slm_dir / SYNTHETIC_FILE, task.num_labels)
    rerun_texts, _ = read_synthetic(again.slm_dir / SYNTHETIC_FILE, task.num_labels)
    assert first == rerun_texts
    assert len(first) == out.metrics["kept"]


def test_unknown_task_and_mismatched_labels_are_refused(tmp_path, engine_setup, tiny_slm_dir):
    from crosslm_shared.errors import ConfigError

    engine, task, slm_dir = engine_setup
    with pytest.raises(ConfigError, match="not served"):
        engine.run_round(_request(tmp_path, slm_dir, task="other"), lambda *_: None)
    wrong = new_slm(str(tiny_slm_dir), ["x", "y"]).save(tmp_path / "wrong")
    with pytest.raises(ConfigError, match="do not match"):
        engine.run_round(_request(tmp_path, wrong, sid="sub-2"), lambda *_: None)


def test_interrupted_round_resumes_after_generation(tmp_path, engine_setup, monkeypatch):
    """A crash after sampling: the rerun replays the checkpointed samples instead of sampling again."""
    import crosslm_server.method.round as round_mod

    engine, task, slm_dir = engine_setup
    request = _request(tmp_path, slm_dir, sid="sub-9")

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-round")

    monkeypatch.setattr(round_mod, "score", crash)
    with pytest.raises(RuntimeError, match="killed"):
        engine.run_round(request, lambda *_: None)
    assert (request.work_dir / "generated.json").exists() and engine.adapters.versions() == []
    monkeypatch.undo()
    sampled = []
    monkeypatch.setattr(round_mod, "generate", lambda *a, **k: sampled.append(1))
    events = []
    out = committed(engine, request, lambda kind, fields: events.append(kind))
    assert sampled == [] and "resumed" in events and "generating" not in events
    assert out.metrics["adapter_version"] == 1


def test_adapters_cli_lists_and_rolls_back_and_the_engine_follows(tmp_path, engine_setup, capsys):
    from crosslm_server.service.cli import main as server_main

    engine, task, slm_dir = engine_setup
    for sid in ("sub-a", "sub-b"):
        committed(engine, _request(tmp_path, slm_dir, sid=sid))
    cfg = tmp_path / "server.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp_path}"\n[engine]\nname = "crosslm"\n'
                   f'[engine.options]\nadapters_dir = "{tmp_path / "adapters"}"\n')
    assert server_main(["adapters", "list", "--config", str(cfg)]) == 0
    listing = capsys.readouterr().out
    assert "* v2" in listing and "sub-a" in listing
    assert server_main(["adapters", "rollback", "1", "--config", str(cfg)]) == 0
    engine._sync_adapter()
    assert engine._version == 1
    assert server_main(["adapters", "rollback", "9", "--config", str(cfg)]) == 2


def test_the_llm_is_measured_at_load_and_after_every_nth_version(tmp_path, tiny_sim_config, tiny_slm_dir,
                                                                   toy_task_path):
    """eval_data: zero-shot accuracy, label rates and perplexity of the real LLM, in the rounds' metrics."""
    import csv

    from crosslm_shared.errors import ConfigError

    task = load_task(toy_task_path)
    eval_csv = tmp_path / "llm-test.csv"
    with eval_csv.open("w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), ("good great movie", "positive"), ("awful dull film", "negative"),
                                 ("meh ok plot", "neutral"), ("superb lovely story", "positive")])
    options = {"config": str(tiny_sim_config), "tasks": [str(toy_task_path)], "background": False,
               "adapters_dir": str(tmp_path / "adapters"), "eval_data": str(eval_csv), "eval_texts": 3,
               "eval_every": 2}
    engine = create_engine("crosslm", options)
    assert engine.ready() and engine.baseline["llm_base_eval_texts"] == 3
    slm_dir = new_slm(str(tiny_slm_dir), task.label_names).save(tmp_path / "submitted")
    events = []
    published = []  # a round that keeps no sample publishes no version (and is not measured)
    for i in range(1, 7):
        metrics = committed(engine, _request(tmp_path, slm_dir, sid=f"s{i}"),
                            lambda kind, fields: events.append(kind)).metrics
        published += [metrics] if metrics["llm_updated"] == 1 else []
        if len(published) == 2:
            break
    first, second = published
    assert "llm_acc" not in first and 0 <= second["llm_acc"] <= 1 and second["llm_ppl"] > 1
    assert events.count("evaluating_llm") == 1
    assert first["llm_base_acc"] == second["llm_base_acc"] and first["llm_base_ppl"] > 1
    assert abs(sum(second[f"llm_rate_{name}"] for name in task.label_names) - 1) < 1e-6
    assert len(first["reward_hist"]) == 10 and len(first["kept_per_label"]) == 3
    assert all(isinstance(n, int) for n in first["reward_hist"] + first["kept_per_label"])
    with pytest.raises(ConfigError, match="eval_data"):
        create_engine("crosslm", options | {"eval_data": str(tmp_path / "missing.csv")})


@pytest.mark.parametrize("source", ["slms", "judged"])
def test_the_generation_loss_rewards_what_the_update_config_names(tmp_path, tiny_sim_config, tiny_slm_dir,
                                                                  toy_task_path, monkeypatch, source):
    """round.update.reward = "judged": the advantage comes from the filter's mix (here all LLM),
    not from the SLMs' reward; "slms" (the default) keeps the seed's reward."""
    import numpy as np

    import crosslm_server.method.round as round_mod
    from crosslm_server.method.reward import reward, standardise_per_label

    seen = {}
    real_update, real_judged = round_mod.update_llm, round_mod.judged_proba

    def judged_proba(scores, *args):
        judged, w = real_judged(scores, *args)
        seen["judged"], seen["slm_advantage"] = judged, scores.advantage
        return judged, w

    def update_llm(llm, task, prompts, texts, labels, advantage, *args, **kwargs):
        seen["advantage"], seen["labels"] = np.asarray(advantage), labels
        return real_update(llm, task, prompts, texts, labels, advantage, *args, **kwargs)

    monkeypatch.setattr(round_mod, "judged_proba", judged_proba)
    monkeypatch.setattr(round_mod, "update_llm", update_llm)
    task = load_task(toy_task_path)
    slm_dir = new_slm(str(tiny_slm_dir), task.label_names).save(tmp_path / "submitted")
    engine = create_engine("crosslm", {"config": str(tiny_sim_config), "tasks": [str(toy_task_path)],
                                       "adapters_dir": str(tmp_path / "adapters"), "background": False,
                                       "set": ["round.filter.llm_weight=1.0", f'round.update.reward="{source}"']})
    engine.run_round(_request(tmp_path, slm_dir), lambda *_: None)
    expected = (seen["slm_advantage"] if source == "slms"
                else standardise_per_label(reward(seen["judged"], seen["labels"]), seen["labels"]))
    assert np.allclose(seen["advantage"], expected)
    assert not np.allclose(seen["slm_advantage"], standardise_per_label(reward(seen["judged"], seen["labels"]),
                                                                        seen["labels"]))  # the two differ here


def test_a_failed_or_rewardless_round_leaves_the_llm_as_it_was(tmp_path, engine_setup, monkeypatch):
    """discard restores the adapter in memory; a round whose rewards are all NaN publishes nothing."""
    import numpy as np
    import torch

    import crosslm_server.method.round as round_mod

    engine, task, slm_dir = engine_setup
    before = engine.llm.adapter_state()
    request = _request(tmp_path, slm_dir, sid="s-fail")
    engine.run_round(request, lambda *_: None)
    changed = engine.llm.adapter_state()
    assert any(not torch.equal(before[k], changed[k]) for k in before)  # the round did train the LoRA
    engine.discard(request)
    assert all(torch.equal(before[k], v) for k, v in engine.llm.adapter_state().items())
    assert engine.adapters.versions() == []

    real_score = round_mod.score
    monkeypatch.setattr(round_mod, "score", lambda *a, **k: (lambda s: type(s)(
        s.probs, np.full_like(s.reward, np.nan), s.advantage))(real_score(*a, **k)))
    nan = committed(engine, _request(tmp_path, slm_dir, sid="s-nan"))
    assert nan.metrics["llm_updated"] == 0 and nan.metrics["adapter_version"] == 0  # still no version
    assert engine.adapters.versions() == []
    assert all(torch.equal(before[k], v) for k, v in engine.llm.adapter_state().items())


def test_an_unknown_reward_source_is_refused():
    from crosslm_server.method.llm_update import UpdateConfig
    from crosslm_shared.errors import ConfigError

    with pytest.raises(ConfigError, match="round.update.reward"):
        UpdateConfig(reward="judge")


def _example_updates() -> list:
    """The distinct `[round.update]` sections of the shipped example configs."""
    from pathlib import Path

    from crosslm_server.method.config import as_dict, load_config

    seen: dict[str, dict] = {}
    for path in sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml")):
        try:
            update = as_dict(load_config(path).round.update)
        except Exception:  # noqa: BLE001 - not a simulate config (server, silo, study files)
            continue
        seen.setdefault(repr(sorted(update.items())), update | {"_from": path.name})
    return list(seen.values())


@pytest.mark.parametrize("update", _example_updates(), ids=lambda u: u["_from"])
def test_a_rerun_after_the_adapter_save_leaves_the_adapter_weights_unchanged(tmp_path, tiny_sim_config,
                                                                            tiny_slm_dir, toy_task_path, update):
    import json

    import torch

    task = load_task(toy_task_path)
    slm_dir = new_slm(str(tiny_slm_dir), task.label_names).save(tmp_path / "submitted")
    keep = {"batch_size", "epochs", "max_length"}  # the tiny config's sizes keep the test fast
    overrides = [f"round.update.{k}={json.dumps(v)}" for k, v in update.items()
                 if k != "_from" and k not in keep and not isinstance(v, (list, tuple, dict))]
    engine = create_engine("crosslm", {"config": str(tiny_sim_config), "tasks": [str(toy_task_path)],
                                       "adapters_dir": str(tmp_path / "adapters"), "background": False,
                                       "set": overrides})
    first = committed(engine, _request(tmp_path, slm_dir))
    assert first.metrics["adapter_version"] == 1
    saved = {k: v.clone() for k, v in engine.llm.adapter_state().items()}
    rerun = RoundRequest("sub-1", "a", "toy", slm_dir, {"a": slm_dir}, tmp_path / "work-rerun")
    again = committed(engine, rerun)
    assert again.metrics["llm_steps"] == 0
    after = engine.llm.adapter_state()
    assert saved.keys() == after.keys()
    assert all(torch.equal(saved[k], after[k]) for k in saved), "a rerun took optimizer steps on the LLM"
