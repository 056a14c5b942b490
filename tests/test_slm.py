import numpy as np
import pytest
import torch

from crosslm_shared.slm import SLMTrainConfig, adopt_if_better, calibrate_temperature, load_slm, new_slm, train_selected

POS = ["good great film", "superb lovely movie", "great fine story", "lovely good plot"] * 4
NEG = ["bad awful film", "dull boring movie", "poor bad story", "awful dull plot"] * 4


def _data():
    return POS + NEG, [1] * len(POS) + [0] * len(NEG)


def test_train_selected_learns_and_saves_roundtrip(tiny_slm_dir, tmp_path):
    torch.manual_seed(0)
    texts, labels = _data()
    cfg = SLMTrainConfig(lrs=(1e-3, 3e-3), max_epochs=6, batch_size=8)
    slm, info = train_selected(str(tiny_slm_dir), ["negative", "positive"], (texts, labels), (texts, labels), cfg)
    assert info["lr"] in cfg.lrs and 1 <= info["epochs"] <= 6
    assert slm.evaluate(texts, labels) == info["val_acc"] >= 0.9
    path = slm.save(tmp_path / "slm")
    assert (path / "model.safetensors").exists() and not list(path.glob("*.bin"))
    again = load_slm(path)
    assert again.labels == ["negative", "positive"] and again.temperature == pytest.approx(slm.temperature)
    assert np.allclose(again.predict_proba(texts), slm.predict_proba(texts), atol=1e-5)


def test_calibration_sharpens_an_underconfident_model(tiny_slm_dir):
    torch.manual_seed(0)
    texts, labels = _data()
    slm, _ = train_selected(str(tiny_slm_dir), ["n", "p"], (texts, labels), (texts, labels),
                            SLMTrainConfig(lrs=(3e-3,), max_epochs=6, batch_size=8))
    with torch.no_grad():  # squash logits: probabilities crowd around 0.5
        slm.model.classifier.weight.mul_(0.05)
        slm.model.classifier.bias.mul_(0.05)
    t = calibrate_temperature(slm, texts, labels)
    assert t < 1.0
    slm.temperature = t
    assert slm.predict_proba(texts).max(1).mean() > slm.predict_proba(texts, calibrated=False).max(1).mean()


def test_soft_targets_and_adopt_if_better(tiny_slm_dir):
    torch.manual_seed(0)
    texts, labels = _data()
    base = new_slm(str(tiny_slm_dir), ["n", "p"])
    cfg = SLMTrainConfig(lrs=(3e-3,), max_epochs=3, batch_size=8)
    chosen, info = adopt_if_better(base, base.clone(), (texts, labels), (texts, labels), cfg)
    assert info["val_acc_returned"] >= info["val_acc_current"] and info["adopted"]
    assert chosen is not base


def test_adopt_if_better_shows_the_continued_model_even_when_it_is_not_kept(tiny_slm_dir):
    torch.manual_seed(0)
    texts, labels = _data()
    cfg = SLMTrainConfig(lrs=(3e-3,), max_epochs=4, batch_size=8, head_lr_mult=1.0)
    good, _ = train_selected(str(tiny_slm_dir), ["n", "p"], (texts, labels), (texts, labels), cfg)
    seen = []
    # the returned model is continued on flipped labels: worse on validation, so the silo keeps `good`
    chosen, info = adopt_if_better(good, good.clone(), (texts, [1 - y for y in labels]), (texts, labels),
                                   cfg, inspect=seen.append)
    assert not info["adopted"] and chosen is good
    assert len(seen) == 1 and seen[0] is not good
    assert seen[0].evaluate(texts, labels) == pytest.approx(info["val_acc_returned"])


def test_head_learns_at_its_own_rate(tiny_slm_dir):
    from crosslm_shared.slm import fit, param_groups

    texts, labels = _data()
    base = new_slm(str(tiny_slm_dir), ["n", "p"])
    groups = param_groups(base.model, 1e-4, 10.0)
    head_ids = {id(p) for n, p in base.model.named_parameters() if n.startswith("classifier")}
    assert [g["lr"] for g in groups] == [1e-4, pytest.approx(1e-3)]
    assert head_ids <= {id(p) for p in groups[1]["params"]} and not head_ids & {id(p) for p in groups[0]["params"]}

    def moved(mult):
        torch.manual_seed(0)
        slm = base.clone()
        before = {n: p.detach().clone() for n, p in slm.model.named_parameters()}
        fit(slm, texts, labels, lr=1e-4, epochs=1, cfg=SLMTrainConfig(batch_size=8, head_lr_mult=mult))
        return {part: sum(float((p - before[n]).norm()) for n, p in slm.model.named_parameters() if (n.startswith("classifier")) == (part == "head"))
                for part in ("head", "body")}

    plain, fast = moved(1.0), moved(20.0)
    assert fast["head"] > 5 * plain["head"]
    with pytest.raises(Exception, match="head_lr_mult"):
        SLMTrainConfig(head_lr_mult=0)


def test_balanced_accuracy_does_not_reward_a_majority_answerer(tiny_slm_dir):
    slm = new_slm(str(tiny_slm_dir), ["n", "p"])
    texts = ["good film"] * 9 + ["bad film"]
    labels = [1] * 9 + [0]
    pred = slm.logits(texts).argmax(-1).numpy()
    acc = slm.evaluate(texts, labels)
    bal = slm.evaluate(texts, labels, metric="balanced_accuracy")
    expected = np.mean([(pred[np.array(labels) == k] == k).mean() for k in (0, 1)])
    assert bal == pytest.approx(expected) and acc == pytest.approx((pred == np.array(labels)).mean())


def test_with_synthetic_appends_soft_targets():
    from crosslm_shared.slm import with_synthetic

    texts, targets = with_synthetic((["a", "b"], [0, 1]), (["c"], np.array([[0.3, 0.7]])), 2)
    assert texts == ["a", "b", "c"]
    assert targets.tolist() == [[1, 0], [0, 1], [pytest.approx(0.3), pytest.approx(0.7)]]
    assert with_synthetic((["a"], [1]), None, 2)[1].tolist() == [[0, 1]]


def test_synthetic_validation_tops_up_only_the_labels_the_silo_lacks():
    from crosslm_shared.slm import synthetic_validation

    val = (["n1", "n2", "n3", "n4"], [0, 0, 0, 0])  # a silo with no positive in its validation split
    syn_texts = [f"s{i}" for i in range(12)]
    syn_targets = np.array([[0.8, 0.2]] * 6 + [[0.3, 0.7]] * 6)
    (vt, vl), (tt, tg) = synthetic_validation(val, (syn_texts, syn_targets), 2, 4, seed=0)
    assert vl.count(1) == 3  # half of the 6 positives at most; the 4 real negatives need no top-up
    assert vl.count(0) == 4 and vt[:4] == val[0]
    assert len(tt) == 9 and not set(tt) & set(vt)  # held-out examples leave the training set
    assert (tg.argmax(1) == 1).sum() == 3
    # nothing to top up: unchanged
    same_val, same_syn = synthetic_validation(val, None, 2, 4)
    assert same_val == (val[0], val[1]) and same_syn is None
    assert synthetic_validation(val, (syn_texts, syn_targets), 2, 0)[1][0] == syn_texts


def test_adopt_if_better_sees_the_label_the_silo_lacks(tiny_slm_dir):
    """A silo without positives in validation keeps a model that finds positives once synthetic data arrives."""
    cfg = SLMTrainConfig(lrs=(1e-3,), max_epochs=1, batch_size=8, min_val_per_label=4)
    base = new_slm(str(tiny_slm_dir), ["neg", "pos"])
    texts = ["bad"] * 8
    syn = (["good"] * 8 + ["bad"] * 8, np.array([[0.0, 1.0]] * 8 + [[1.0, 0.0]] * 8))
    _, info = adopt_if_better(base, base.clone(), (texts, [0] * 8), (["bad"] * 4, [0] * 4), cfg, synthetic=syn)
    assert info["n_val"] == 8  # 4 real negatives + 4 held-out synthetic positives


def test_class_weights_balance_labels_and_cap():
    import torch

    from crosslm_shared.slm import class_weights

    y = torch.nn.functional.one_hot(torch.tensor([0] * 6 + [1] * 2), 2).float()
    w = class_weights(y, SLMTrainConfig())
    assert w[:6].sum() == pytest.approx(w[6:].sum())  # each label carries the same total weight
    assert class_weights(y, SLMTrainConfig(class_weighting="none")).tolist() == [1.0] * 8
    skewed = torch.nn.functional.one_hot(torch.tensor([0] * 99 + [1]), 2).float()
    assert class_weights(skewed, SLMTrainConfig(max_class_weight=10.0)).max() == 10.0
