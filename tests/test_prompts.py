"""The LLM's label logits: the shared-prefix cache and the last-position LM head give what a
plain forward over each whole prompt gives, values and gradients, in the texts' order."""

from __future__ import annotations

import pytest
import torch

from crosslm_server.llm import LLMConfig, load_llm
from crosslm_server.prompts import (_shared_prefix, batched_label_logits, classification_prompt, label_logits,
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


def test_shared_prefix_leaves_each_row_a_token_and_skips_short_ones():
    assert _shared_prefix([list(range(20)), list(range(12)) + [99]]) == 12
    assert _shared_prefix([list(range(10)), list(range(10))]) == 9
    assert _shared_prefix([list(range(20)), [0, 1, 2, 99]]) == 0  # 3 shared: under the minimum


def test_label_logits_match_a_plain_forward_values_and_gradients(llm, toy_task_path):
    task = load_task(toy_task_path)
    tok, model = llm.tokenizer, llm.model
    verb = verbalizer_ids(tok, task)
    rows = [tok(classification_prompt(tok, task, t), add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert _shared_prefix(rows) >= 8  # the cache path runs
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
