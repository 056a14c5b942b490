"""DP-SGD on the silo's SLM (crosslm_shared.dp): the accountant composes, clipping and noise act,
the budget refuses past its end. Tiny random BERTs, real Opacus."""
import json
import random

import pytest
import torch

from crosslm_shared.dp import PrivacyBudget, PrivateRun, epsilon_of
from crosslm_shared.errors import ConfigError, PrivacyError
from crosslm_shared.privacy import PrivacyConfig
from crosslm_shared.slm import adopt_if_better, fit, train_selected
from crosslm_shared.slm_config import SLMTrainConfig
from fakes.tiny_shared_slm import tiny_shared_slm
from fakes.tiny_slm import WORDS

LABELS = ["neg", "pos"]


def _data(n, seed=0):
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(n)]
    return texts, [rng.randrange(2) for _ in range(n)]


def _budget(tmp_path=None, *, epsilon=3.0, planned=3, n=64):
    path = None if tmp_path is None else tmp_path / "ledger.json"
    return PrivacyBudget(PrivacyConfig(enabled=True, epsilon=epsilon), n_records=n, planned=planned, path=path)


def test_epsilon_grows_with_steps_and_falls_with_noise():
    eps = [epsilon_of([(1.0, 0.1, steps)], 1e-5, "rdp") for steps in (10, 100, 1000)]
    assert 0 < eps[0] < eps[1] < eps[2]
    assert epsilon_of([(4.0, 0.1, 100)], 1e-5, "rdp") < eps[1]
    # two trainings compose to more than either alone
    both = epsilon_of([(1.0, 0.1, 100), (1.0, 0.05, 100)], 1e-5, "rdp")
    assert both > max(eps[1], epsilon_of([(1.0, 0.05, 100)], 1e-5, "rdp"))


def test_budget_spreads_over_planned_trainings_and_refuses_past_them(tmp_path):
    budget = _budget(tmp_path, epsilon=3.0, planned=3)
    spent = []
    for k in range(3):
        plan = budget.plan(n=64, batch_size=8, epochs=2, runs=2, what=f"training {k}")
        assert plan.steps == 2 * 2 * 8 and plan.sample_rate == pytest.approx(1 / 8)
        spent.append(budget.record(plan, steps=plan.steps, what=f"training {k}"))
    assert spent[0] < spent[1] < spent[2] <= 3.0 + 1e-6
    assert spent[0] == pytest.approx(1.0, abs=0.05) and spent[2] == pytest.approx(3.0, abs=0.05)
    with pytest.raises(PrivacyError, match="refusing to train.*3 are spent"):
        budget.plan(n=64, batch_size=8, epochs=2, runs=2, what="one more")
    # the ledger survives a restart: a new budget on the same file still refuses
    again = _budget(tmp_path, epsilon=3.0, planned=3)
    assert again.spent() == pytest.approx(spent[2])
    with pytest.raises(PrivacyError, match="refusing to train"):
        again.plan(n=64, batch_size=8, epochs=2, runs=2, what="after restart")


def test_check_send_refuses_a_model_past_the_budget():
    budget = _budget(epsilon=1.0, planned=1)
    plan = budget.plan(n=64, batch_size=8, epochs=1, runs=1, what="first")
    budget.record(plan, steps=plan.steps, what="first")
    assert budget.check_send() <= 1.0 + 1e-6
    weak = type(plan)(plan.noise_multiplier / 4, plan.sample_rate, plan.steps, plan.max_grad_norm)
    budget.record(weak, steps=weak.steps, what="more than planned")
    with pytest.raises(PrivacyError, match="refusing to send"):
        budget.check_send()


def test_per_example_gradients_are_clipped_and_noise_is_added(tmp_path):
    slm = tiny_shared_slm(LABELS, tmp_path / "tok")
    model = slm.model
    model.train()
    texts, ys = _data(32)
    clip = 1e-3
    budget = _budget()
    plan = type(budget.plan(n=32, batch_size=8, epochs=1, runs=1, what="x"))(0.0, 1 / 4, 4, clip)
    opt = torch.optim.SGD([p for p in model.parameters()], lr=1.0)
    with PrivateRun(model, opt, 32, plan, seed=0) as run:
        idx = next(i for i in run.batches() if i)
        enc = slm.tokenizer([texts[j] for j in idx], padding=True, return_tensors="pt")
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, torch.tensor([ys[j] for j in idx]))
        loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        per_example = torch.stack([p.grad_sample.reshape(len(idx), -1).norm(dim=1) for p in params]).norm(dim=0)
        assert (per_example > 10 * clip).all()  # without clipping the step would be far larger
        run.optimizer.pre_step()
        total = torch.cat([p.grad.flatten() for p in params]).norm()
        # the step is the mean of clipped gradients over the expected batch: at most C * |B| / E|B|
        assert total <= clip * len(idx) / 8 * (1 + 1e-4)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())

    noisy = type(plan)(2.0, 1 / 4, 4, clip)
    opt = torch.optim.SGD([p for p in model.parameters()], lr=1.0)
    with PrivateRun(model, opt, 32, noisy, seed=0) as run:
        enc = slm.tokenizer([""], return_tensors="pt")
        (model(**enc).logits.sum() * 0.0).backward()  # an empty batch: zero gradient, noise only
        run.optimizer.pre_step()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        assert grad.std().item() == pytest.approx(2.0 * clip / 8, rel=0.1)


@pytest.mark.parametrize("train_layers", [-1, 1])
def test_dp_fit_trains_the_top_layers_and_never_the_embedding_tables(tmp_path, train_layers):
    slm = tiny_shared_slm(LABELS, tmp_path / "tok")
    before = {n: p.detach().clone() for n, p in slm.model.named_parameters()}
    texts, ys = _data(48)
    budget = PrivacyBudget(PrivacyConfig(enabled=True, train_layers=train_layers), n_records=48, planned=1)
    cfg = SLMTrainConfig(lrs=(1e-3,), max_epochs=2, batch_size=8)
    plan = budget.plan(n=48, batch_size=8, epochs=2, runs=1, what="fit")
    info = fit(slm, texts, ys, lr=1e-3, epochs=2, cfg=cfg, dp=plan)
    assert info["dp_steps"] == plan.steps
    changed = {n for n, p in slm.model.named_parameters() if not torch.equal(p, before[n])}
    assert not any("embeddings.word" in n or "position_embeddings" in n for n in changed)
    assert any("encoder.layer.1." in n for n in changed) and any("classifier" in n for n in changed)
    # the tiny BERT has 2 layers: with train_layers = 1 the lower one keeps its initial values
    assert any("encoder.layer.0." in n for n in changed) == (train_layers == -1)
    assert all(p.requires_grad for p in slm.model.parameters())  # unfrozen again after the run
    slm.save(tmp_path / "saved")  # no Opacus state left on the model


def test_train_selected_and_continuation_charge_the_budget_and_state_it(tmp_path):
    texts, ys = _data(48)
    val = _data(16, seed=1)
    budget = _budget(tmp_path, n=48, planned=2)
    cfg = SLMTrainConfig(lrs=(1e-3, 2e-3), max_epochs=2, batch_size=8)
    first, info = train_selected(tiny_shared_slm(LABELS, tmp_path / "tok"), LABELS, (texts, ys), val, cfg,
                                 privacy=budget)
    assert info["privacy"]["trainings"] == 1 and 0 < info["privacy"]["epsilon"] < 3.0
    assert budget.entries[0]["steps"] == 2 * 2 * 6  # both learning rates saw the records
    synthetic = (_data(16, seed=2)[0], torch.nn.functional.one_hot(torch.tensor(_data(16, seed=2)[1]), 2).numpy())
    _, info2 = adopt_if_better(first, first.clone(), (texts, ys), val, cfg, synthetic=synthetic, privacy=budget)
    assert info2["privacy"]["trainings"] == 2 and info2["privacy"]["epsilon"] == pytest.approx(3.0, abs=0.05)
    # private + synthetic records: the sample rate is over all 64 of them
    assert budget.entries[1]["sample_rate"] == pytest.approx(1 / 8)
    saved = first.save(tmp_path / "model")
    assert json.loads((saved / "crosslm.json").read_text())["info"]["privacy"]["epsilon"] == info["privacy"]["epsilon"]


@pytest.mark.parametrize("bad, match", [({"epsilon": 0}, "epsilon"), ({"delta": 1.5}, "delta"),
                                         ({"max_grad_norm": -1}, "max_grad_norm"), ({"accountant": "gdp"}, "accountant"),
                                         ({"rounds": -1}, "rounds")])
def test_privacy_config_names_the_bad_field(bad, match):
    with pytest.raises(ConfigError, match=match):
        PrivacyConfig(**bad)


def test_delta_defaults_to_the_smaller_of_1e5_and_one_over_n():
    assert PrivacyConfig().delta_for(100) == 1e-5
    assert PrivacyConfig().delta_for(1_000_000) == 1e-6
    assert PrivacyConfig(delta=1e-4).delta_for(100) == 1e-4
