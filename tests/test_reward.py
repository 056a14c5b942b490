import numpy as np
import pytest

from crosslm_server.method.reward import reward, standardise_per_label


def test_reward_is_two_s_minus_one():
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5]])
    r = reward(probs, [0, 0, 1])
    assert r == pytest.approx([0.8, -0.4, 0.0])


def test_reward_bounds():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert reward(probs, [0, 0]).tolist() == [1.0, -1.0]


def test_advantage_is_standardised_within_each_label():
    r = np.array([0.01, 0.03, 0.02, 0.5, 0.9])
    labels = [0, 0, 0, 1, 1]
    a = standardise_per_label(r, labels)
    for lab in (0, 1):
        m = np.array(labels) == lab
        assert a[m].mean() == pytest.approx(0.0, abs=1e-9)
        assert a[m].std() == pytest.approx(1.0, abs=1e-6)
    # a spread of 0.02 becomes a unit spread: the generation loss is not drowned by the others
    assert a[1] > a[2] > a[0]


def test_single_sample_or_flat_label_carries_no_preference():
    a = standardise_per_label(np.array([0.3, 0.5, 0.5]), [0, 1, 1])
    assert a.tolist() == [0.0, 0.0, 0.0]


def test_llm_scores_are_centred_and_mixed_at_the_filter_weight(tiny_llm_dir, toy_task_path):
    import torch

    from crosslm_server.method.llm import LLMConfig, load_llm
    from crosslm_server.method.reward import Scores, judged_proba, llm_label_proba
    from crosslm_shared.tasks import load_task

    task = load_task(str(toy_task_path))
    llm = load_llm(LLMConfig(model=str(tiny_llm_dir), lora_r=4, target_modules=("q_proj", "v_proj")))
    texts = ["good film", "bad film", "fine plot", "dull story", "great"]
    p = llm_label_proba(llm, task, texts)
    assert p.shape == (5, task.num_labels) and np.allclose(p.sum(1), 1.0, atol=1e-5)
    # centring: raising one label word's output bias (the LLM's prior) leaves the scores as they were
    from crosslm_server.method.prompts import label_logits, verbalizer_ids

    def raw():
        with torch.no_grad():
            return torch.softmax(label_logits(llm.model, llm.tokenizer, task, texts, verbalizer_ids(llm.tokenizer, task)), -1)

    raw_before = raw()
    head = llm.model.get_output_embeddings()
    with torch.no_grad():
        if head.bias is None:
            head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]))
        head.bias[verbalizer_ids(llm.tokenizer, task)[0]] += 3.0
    assert (raw()[:, 0] > raw_before[:, 0] + 0.05).all()  # uncentred, the shift shows
    assert np.allclose(llm_label_proba(llm, task, texts), p, atol=1e-4)
    slm = np.full((5, task.num_labels), 1.0 / task.num_labels)
    scores = Scores(probs=slm, reward=np.zeros(5), advantage=np.zeros(5))
    labels = [0, 1, 0, 1, 0]
    judged, w = judged_proba(scores, llm, task, texts, labels, 0.0)
    assert judged is slm and w == 0.0
    judged, w = judged_proba(scores, llm, task, texts, labels, 0.25)
    assert w == 0.25 and np.allclose(judged, 0.75 * slm + 0.25 * p, atol=1e-4)
    # "auto": uniform SLMs know nothing of the labels, so the LLM gets all of the weight if it
    # tells the intended labels apart at all, and none if it does not
    judged, w = judged_proba(scores, llm, task, texts, labels, "auto")
    from crosslm_server.method.reward import label_agreement

    assert w == (1.0 if label_agreement(p, labels) > 0.5 else 0.0)
    assert np.allclose(judged, (1 - w) * slm + w * p, atol=1e-4)


def test_auto_llm_weight_follows_which_scorer_predicts_the_intended_labels():
    from crosslm_server.method.reward import auto_llm_weight, label_agreement

    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    perfect = np.eye(2)[labels] * 0.8 + 0.1
    noisy = np.eye(2)[[0, 1, 0, 0, 1, 0, 1, 1]] * 0.8 + 0.1  # 6 of 8 right
    blind = np.full((8, 2), 0.5)
    assert label_agreement(perfect, labels) == 1.0 and label_agreement(blind, labels) == 0.5
    assert 0.5 < label_agreement(noisy, labels) < 1.0
    # the LLM's share is its edge over chance against the SLMs' (RT-like: LLM better; SMS-like: worse)
    assert auto_llm_weight(noisy, perfect, labels) > 0.5 > auto_llm_weight(perfect, noisy, labels) > 0
    assert auto_llm_weight(perfect, blind, labels) == 0.0 and auto_llm_weight(blind, perfect, labels) == 1.0
    assert auto_llm_weight(blind, blind, labels) == 0.0  # neither knows: the SLMs alone, as without the LLM
    # a label the batch lacks is left out rather than breaking the estimate
    three = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])
    assert label_agreement(three, [0, 1, 0, 1]) == 1.0


@pytest.mark.parametrize("bad", [1.5, -0.1, "half", True])
def test_llm_weight_rejects_what_is_neither_a_weight_nor_auto(bad):
    from crosslm_server.method.filter import FilterConfig
    from crosslm_shared.errors import ConfigError

    with pytest.raises(ConfigError, match="llm_weight"):
        FilterConfig(llm_weight=bad)
    assert FilterConfig(llm_weight="auto").llm_weight == "auto"
