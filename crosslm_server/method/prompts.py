"""Prompts for the LLM, built from the task spec with the model's chat template.

Generation: the user turn is one of the label's instructions; the assistant turn is opened
with the task's prefix (``Review: "``) so the answer is the text itself, closed by the
closing mark. Classification: the assistant turn is opened with ``Answer:`` and the next
token decides the label, by the verbalizers' first tokens.
"""

from __future__ import annotations

import torch

from crosslm_shared.errors import ConfigError
from crosslm_shared.tasks import TaskSpec


def _chat(tokenizer, task: TaskSpec, user: str) -> str:
    messages = []
    if task.system_prompt:
        messages.append({"role": "system", "content": task.system_prompt})
    messages.append({"role": "user", "content": user})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{task.system_prompt}\n{user}\n".lstrip()


def generation_prompt(tokenizer, task: TaskSpec, label: int, template: int) -> str:
    instructions = task.generation_prompts(label)
    return _chat(tokenizer, task, instructions[template % len(instructions)]) + task.generation_prefix


def classification_prompt(tokenizer, task: TaskSpec, text: str) -> str:
    return _chat(tokenizer, task, task.classification_prompt(text)) + task.answer_prefix


def verbalizer_ids(tokenizer, task: TaskSpec) -> list[int]:
    """First token of " <verbalizer>" for each label; they must differ (checked)."""
    ids = []
    for lab in task.labels:
        toks = tokenizer(" " + lab.verbalizer.strip(), add_special_tokens=False)["input_ids"]
        if not toks:
            raise ConfigError(f"verbalizer {lab.verbalizer!r} of task {task.name!r} tokenizes to nothing")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ConfigError(
            f"task {task.name!r}: verbalizers {[lab.verbalizer for lab in task.labels]} share a first token "
            "for this LLM's tokenizer; pick words that start differently"
        )
    return ids


def pad_right(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows into (input_ids, attention_mask); positions then match unpadded ones."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def label_logits(model, tokenizer, task: TaskSpec, texts, verb_ids: list[int], *, max_length: int = 192):
    """Logits of each label's verbalizer token after the classification prompt: shape (n, K).

    The prompt's tokens that every row shares (the chat template's system turn and the
    instruction: about half of a review's) run once, as a cache the rows continue from, and only
    each row's last position goes through the LM head (the full-vocabulary logits of every
    position were most of an evaluation's time and memory). Gradients flow through both."""
    rows = []
    for text in texts:
        ids = tokenizer(classification_prompt(tokenizer, task, text), add_special_tokens=False)["input_ids"]
        rows.append(ids[-max_length:])
    device = next(model.parameters()).device
    ids, mask = pad_right(rows, tokenizer.pad_token_id, device)
    last = mask.sum(1) - 1
    keep = torch.unique(last)
    logits = shared_prefix_forward(model, ids, mask, shared=shared_prefix(rows), keep=keep)
    return logits[torch.arange(len(rows), device=device), torch.searchsorted(keep, last)][:, verb_ids].float()


def shared_prefix_forward(model, ids: torch.Tensor, mask: torch.Tensor, *, shared: int,
                          keep: torch.Tensor) -> torch.Tensor:
    """Logits (rows, len(keep), vocab) at the sequence positions ``keep`` (each >= ``shared``) of
    right-padded rows whose first ``shared`` tokens are the same in every row: those run once, as a
    KV cache the rows continue from; only the kept positions go through the LM head. Exact, and
    gradients flow through the cache (the adapter shapes it too)."""
    if not shared:
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    cache = model(input_ids=ids[:1, :shared], use_cache=True).cache
    cache.batch_repeat_interleave(len(ids))
    return model(input_ids=ids[:, shared:], attention_mask=mask, cache=cache, use_cache=True,
                 logits_to_keep=keep - shared).logits


def shared_prefix(rows: list[list[int]], *, min_tokens: int = 8) -> int:
    """Tokens every row starts with, leaving each row at least one of its own; 0 if under ``min_tokens``."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for r in rows[1:]:
        n = next((i for i in range(n) if r[i] != first[i]), n)
    return n if n >= min_tokens else 0


def batched_label_logits(llm, task: TaskSpec, texts, *, batch_size: int = 16):
    """:func:`label_logits` of the LLM (eval mode, no gradient) over ``texts`` in batches: (n, K) on CPU,
    in the order of ``texts``. Batches are of texts of similar length, so little of them is padding."""
    verb = verbalizer_ids(llm.tokenizer, task)
    texts = list(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    llm.model.eval()
    with torch.no_grad():
        out = [label_logits(llm.model, llm.tokenizer, task, [texts[j] for j in order[i:i + batch_size]], verb).cpu()
               for i in range(0, len(texts), batch_size)]
    if not out:
        return torch.zeros(0, task.num_labels)
    result = torch.empty(len(texts), task.num_labels)
    result[torch.as_tensor(order)] = torch.cat(out)
    return result
