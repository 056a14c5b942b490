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
