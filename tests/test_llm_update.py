"""The LLM update's math on a tiny random Llama with a LoRA adapter."""

import numpy as np
import pytest
import torch

from crosslm_server.method.llm import LLMConfig, load_llm
from crosslm_server.method.llm_update import (UpdateConfig, build_gen_batch, class_weights, gen_terms, task_term,
                                       update_llm)
from crosslm_server.method.prompts import generation_prompt, label_logits, verbalizer_ids
from crosslm_shared.tasks import load_task


@pytest.fixture()
def llm(tiny_llm_dir):
    torch.manual_seed(0)
    return load_llm(LLMConfig(model=str(tiny_llm_dir), lora_r=4, target_modules=("q_proj", "v_proj")))


@pytest.fixture()
def task(toy_task_path):
    return load_task(toy_task_path)


def _batch(llm, task, texts, labels):
    prompts = [generation_prompt(llm.tokenizer, task, lab, 0) for lab in labels]
    return prompts, build_gen_batch(llm.tokenizer, prompts, texts, task.closing_mark, max_length=64, device=llm.device)


def test_prompt_tokens_are_masked_out_of_the_generation_loss(llm, task):
    prompts, batch = _batch(llm, task, ["good movie", "bad plot and dull film"], [1, 0])
    for i, prompt in enumerate(prompts):
        n_prompt = len(llm.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert batch.gen_mask[i, :n_prompt].sum() == 0
        assert batch.gen_mask[i, n_prompt:].sum() == batch.attention_mask[i, n_prompt:].sum() > 0
    # L_gen equals the manual mean log-likelihood of generated tokens only
    adv = torch.tensor([1.0, 1.0])
    l_gen, _ = gen_terms(llm.model, batch, adv, with_kl=False)
    logits = llm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    m = batch.gen_mask[:, 1:].float()
    manual = -((logp * m).sum(1) / m.sum(1)).mean()
    assert float(l_gen) == pytest.approx(float(manual), rel=1e-5)
    # changing a prompt token's target leaves the loss over generated tokens unaffected except via context
    assert m.sum() < batch.attention_mask[:, 1:].sum()


def test_kl_is_exactly_zero_while_lora_b_is_zero(llm, task):
    for name, p in llm.model.named_parameters():
        if "lora_B" in name:
            assert torch.count_nonzero(p) == 0
    _, batch = _batch(llm, task, ["good movie", "bad plot"], [1, 0])
    _, kl = gen_terms(llm.model, batch, torch.zeros(2), with_kl=True)
    assert float(kl) == 0.0


def test_kl_grows_once_the_adapter_moves(llm, task):
    with torch.no_grad():
        for name, p in llm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    _, batch = _batch(llm, task, ["good movie"], [1])
    _, kl = gen_terms(llm.model, batch, torch.zeros(1), with_kl=True)
    assert float(kl) > 0


def _seq_logp(llm, batch):
    with torch.no_grad():
        logits = llm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        logp = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        m = batch.gen_mask[:, 1:].float()
        return ((logp * m).sum(1) / m.sum(1)).numpy()


def test_positive_advantage_gains_likelihood_negative_loses(llm, task):
    texts, labels = ["great superb lovely film", "awful dull boring plot"], [1, 0]
    prompts, batch = _batch(llm, task, texts, labels)
    before = _seq_logp(llm, batch)
    cfg = UpdateConfig(gamma_gen=1.0, gamma_task=0.0, gamma_kl=0.0, lr=5e-3, batch_size=2, epochs=1)
    stats = update_llm(llm, task, prompts, texts, labels, [1.0, -1.0], [], cfg, seed=0)
    after = _seq_logp(llm, batch)
    assert stats["steps"] == 1
    assert after[0] > before[0]
    assert after[1] < before[1]


def test_task_loss_is_restricted_to_verbalizers_and_class_balanced(llm, task):
    verb = verbalizer_ids(llm.tokenizer, task)
    logits = label_logits(llm.model, llm.tokenizer, task, ["good film", "bad film"], verb)
    assert logits.shape == (2, task.num_labels)
    w = class_weights([0, 0, 0, 1], 3)
    assert w.tolist() == pytest.approx([4 / 6, 2.0, 0.0])
    loss = task_term(llm.model, llm.tokenizer, task, ["good film", "bad film"], [1, 0], verb, class_weights([1, 0], 3))
    manual = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0]))
    assert float(loss) == pytest.approx(float(manual), rel=1e-5)


def test_task_loss_raises_the_right_label_word(llm, task):
    texts, labels = ["great superb lovely film"] * 4 + ["awful dull boring plot"] * 4, [1] * 4 + [0] * 4
    prompts = [generation_prompt(llm.tokenizer, task, y, 0) for y in labels]
    verb = verbalizer_ids(llm.tokenizer, task)
    with torch.no_grad():
        before = torch.log_softmax(label_logits(llm.model, llm.tokenizer, task, texts, verb), -1)
    cfg = UpdateConfig(gamma_gen=0.0, gamma_task=1.0, gamma_kl=0.0, lr=1e-2, batch_size=8, epochs=3)
    update_llm(llm, task, prompts, texts, labels, np.zeros(8), list(range(8)), cfg, seed=0)
    with torch.no_grad():
        after = torch.log_softmax(label_logits(llm.model, llm.tokenizer, task, texts, verb), -1)
    idx = torch.arange(8)
    y = torch.tensor(labels)
    assert after[idx, y].mean() > before[idx, y].mean()


def test_centred_task_loss_is_blind_to_a_label_bias_and_the_plain_one_is_not(llm, task, monkeypatch):
    """A constant added to one label's logit on every text (answering that label more often)
    changes the plain task loss but not the centred one: the centred loss can only be lowered
    by telling the labels apart."""
    import crosslm_server.method.llm_update as lu

    verb = verbalizer_ids(llm.tokenizer, task)
    texts, labels = ["good film", "bad film", "fine plot", "dull plot"], [1, 0, 1, 0]
    w = class_weights(labels, task.num_labels)
    real = lu.label_logits

    def losses(shift: float) -> tuple[float, float]:
        def shifted(*args, **kwargs):
            out = real(*args, **kwargs).clone()
            out[:, 1] += shift
            return out
        monkeypatch.setattr(lu, "label_logits", shifted)
        with torch.no_grad():
            return (float(task_term(llm.model, llm.tokenizer, task, texts, labels, verb, w, centered=True)),
                    float(task_term(llm.model, llm.tokenizer, task, texts, labels, verb, w, centered=False)))

    centred0, plain0 = losses(0.0)
    centred5, plain5 = losses(5.0)
    assert centred5 == pytest.approx(centred0, rel=1e-5)
    assert abs(plain5 - plain0) > 0.1


@pytest.mark.parametrize("centering", [True, False])
def test_both_task_losses_separate_the_labels(llm, task, centering):
    texts, labels = ["great superb lovely film"] * 4 + ["awful dull boring plot"] * 4, [1] * 4 + [0] * 4
    prompts = [generation_prompt(llm.tokenizer, task, y, 0) for y in labels]
    verb = verbalizer_ids(llm.tokenizer, task)

    def margin() -> float:  # mean over texts of (right label's logit - the other's)
        with torch.no_grad():
            z = label_logits(llm.model, llm.tokenizer, task, texts, verb)[:, :2]
        return float((z[:4, 1] - z[:4, 0]).mean() - (z[4:, 1] - z[4:, 0]).mean())

    before = margin()
    cfg = UpdateConfig(gamma_gen=0.0, gamma_task=1.0, gamma_kl=0.0, lr=1e-2, batch_size=8, epochs=3,
                       task_centering=centering)
    update_llm(llm, task, prompts, texts, labels, np.zeros(8), list(range(8)), cfg, seed=0)
    assert margin() > before


def test_prior_shift_sees_a_label_prior_move_and_nothing_else(llm, task):
    from crosslm_server.method.llm_update import prior_shift

    verb = verbalizer_ids(llm.tokenizer, task)
    texts = ["good film", "bad film", "fine plot", "dull plot"]
    with torch.no_grad():
        logits = label_logits(llm.model, llm.tokenizer, task, texts, verb).float()
        # a fresh adapter is the base: nothing moved
        assert float(prior_shift(llm.model, llm.tokenizer, task, texts, verb, logits)) == pytest.approx(0.0, abs=1e-8)
        # the same shift on every label changes no answer
        assert float(prior_shift(llm.model, llm.tokenizer, task, texts, verb, logits + 2.0)) == pytest.approx(0.0, abs=1e-8)
        moved = logits.clone()
        moved[:, 1] += 1.5  # one label answered more often on every text
        k = task.num_labels
        assert float(prior_shift(llm.model, llm.tokenizer, task, texts, verb, moved)) == pytest.approx(1.5 ** 2 * (k - 1) / k, rel=1e-4)
        # telling texts apart, prior unchanged: a shift that sums to zero over the texts
        apart = logits.clone()
        apart[:2, 1] += 1.0
        apart[2:, 1] -= 1.0
        assert float(prior_shift(llm.model, llm.tokenizer, task, texts, verb, apart)) == pytest.approx(0.0, abs=1e-6)


def test_update_with_the_prior_anchor_reports_it(llm, task):
    texts, labels = ["great superb lovely film", "awful dull boring plot"] * 4, [1, 0] * 4
    prompts = [generation_prompt(llm.tokenizer, task, y, 0) for y in labels]
    out = update_llm(llm, task, prompts, texts, labels, [1.0, -1.0] * 4, list(range(8)),
                     UpdateConfig(gamma_prior=1.0, epochs=2, batch_size=4, lr=5e-3), seed=0)
    assert out["steps"] == 4 and out["l_prior"] >= 0.0
    with pytest.raises(Exception, match="gamma"):
        UpdateConfig(gamma_prior=-1.0)
