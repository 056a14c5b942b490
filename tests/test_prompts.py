"""The LLM's label logits: the shared-prefix cache and the last-position LM head give what a
plain forward over each whole prompt gives, values and gradients, in the texts' order."""

from __future__ import annotations

import pytest
import torch

from crosslm_server.method.llm import LLMConfig, load_llm
from crosslm_server.method.prompts import (shared_prefix, batched_label_logits, classification_prompt, label_logits,
                                    pad_right, verbalizer_ids)
from crosslm_shared.tasks import load_task

# a long shared opening, so the rows share more than the prompt's few template tokens and the
# cache is used (the tiny tokenizer's template alone is under the 8-token minimum)
OPENING = "good great fine superb lovely bad awful poor dull boring "
TEXTS = [OPENING + t for t in ("film", "plot story movie", "ok", "meh average okay film plot", "great")]


@pytest.fixture()
def llm(tiny_llm_dir):
    torch.manual_seed(0)
    llm = load_llm(LLMConfig(model=str(tiny_llm_dir), lora_r=4, target_modules=("q_proj", "v_proj", "o_proj")))
    with torch.no_grad():  # a trained adapter, not the zero one: the cache must carry it
        for name, p in llm.model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    return llm


def plain(model, tokenizer, task, texts, verb):
    rows = [tokenizer(classification_prompt(tokenizer, task, t), add_special_tokens=False)["input_ids"] for t in texts]
    ids, mask = pad_right(rows, tokenizer.pad_token_id, "cpu")
    logits = model(input_ids=ids, attention_mask=mask).logits
    return logits[torch.arange(len(rows)), mask.sum(1) - 1][:, verb].float()


def testshared_prefix_leaves_each_row_a_token_and_skips_short_ones():
    assert shared_prefix([list(range(20)), list(range(12)) + [99]]) == 12
    assert shared_prefix([list(range(10)), list(range(10))]) == 9
    assert shared_prefix([list(range(20)), [0, 1, 2, 99]]) == 0  # 3 shared: under the minimum


def test_label_logits_match_a_plain_forward_values_and_gradients(llm, toy_task_path):
    task = load_task(toy_task_path)
    tok, model = llm.tokenizer, llm.model
    verb = verbalizer_ids(tok, task)
    rows = [tok(classification_prompt(tok, task, t), add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert shared_prefix(rows) >= 8  # the cache path runs
    model.eval()
    ref = plain(model, tok, task, TEXTS, verb)
    got = label_logits(model, tok, task, TEXTS, verb)
    assert torch.allclose(got, ref, atol=1e-5)
    grads = []
    for fn in (plain, label_logits):
        model.zero_grad()
        (fn(model, tok, task, TEXTS, verb) * torch.arange(1, 1 + len(verb))).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


def test_batched_label_logits_keep_the_texts_order(llm, toy_task_path):
    task = load_task(toy_task_path)
    verb = verbalizer_ids(llm.tokenizer, task)
    texts = TEXTS + ["bad", "awful dull plot movie story film"]
    with torch.no_grad():
        ref = plain(llm.model, llm.tokenizer, task, texts, verb)
    got = batched_label_logits(llm, task, texts, batch_size=3)
    assert torch.allclose(got, ref, atol=1e-5)
    assert batched_label_logits(llm, task, [], batch_size=3).shape == (0, task.num_labels)


def test_gen_terms_match_a_plain_forward_values_and_gradients(llm, toy_task_path):
    """L_gen and the KL through the shared-prefix cache and the kept positions equal the plain
    full-logits computation (the way before 2026-12-02), gradients included."""
    from crosslm_server.method.llm_update import build_gen_batch, gen_terms

    task = load_task(toy_task_path)
    model = llm.model
    prompts = [OPENING + p for p in ("write one good review :", "write a bad sentence :", "write one ok review :")]
    texts = ["great film", "awful dull plot story movie", "meh"]
    batch = build_gen_batch(llm.tokenizer, prompts, texts, task.closing_mark, max_length=64, device="cpu")
    assert batch.shared >= 8
    adv = torch.tensor([1.0, -0.5, 0.25])

    def plain_terms():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
        target, mask = batch.input_ids[:, 1:], batch.gen_mask[:, 1:].float()
        logp = torch.log_softmax(logits, -1)
        seq = (logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask).sum(1) / mask.sum(1)
        with torch.no_grad(), model.disable_adapter():
            base = torch.log_softmax(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1], -1)
        kl = ((logp.exp() * (logp - base)).sum(-1) * mask).sum() / mask.sum()
        return -(adv * seq).mean(), kl

    results = []
    for fn in (plain_terms, lambda: gen_terms(model, batch, adv, with_kl=True)):
        model.zero_grad()
        l_gen, kl = fn()
        (l_gen + kl).backward()
        results.append((float(l_gen), float(kl), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (g0, k0, grads0), (g1, k1, grads1) = results
    assert g1 == pytest.approx(g0, abs=1e-5) and k1 == pytest.approx(k0, abs=1e-6) and k0 > 0
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        assert torch.allclose(grads0[name], grads1[name], atol=1e-5), name
