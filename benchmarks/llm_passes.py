"""The LLM's passes outside generation, naive vs the product's way: scoring texts as a classifier
(zero-shot accuracy, the filter's judgement) and the LoRA step's L_gen + KL.

    .venv/bin/python benchmarks/llm_passes.py [--quick] [--texts 256] [--threads 1]

SmolLM2-135M with its LoRA adapter scores each text by the logits of the labels' verbalizer
tokens after the classification prompt (``crosslm_server.method.prompts``). Every evaluation of the
LLM (400 test texts per snapshot in the study) and every filter batch with ``llm_weight`` runs
this. Naive: texts batched in their given order, the full-vocabulary logits of every position
(batch x length x 49k floats). The product: batches of texts of similar length, the prompt's
tokens every row of a batch shares (chat template, instruction) run once as a KV cache, and only
each row's last position goes through the LM head. Same texts (the task's public examples), same
batch size; the answers must agree (checked: the largest logit difference is printed).

LoRA step: L_gen and KL(G_θ‖G_0) with their backward on a batch of 8 generation prompts and
texts (the round's batch). Naive: full-vocabulary logits at every position, twice (adapter on and
off). The product: only positions that predict a generated token, the prompts' shared tokens once.
Best of 2 each; the losses and the gradient norm must agree. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from _common import base_parser, emit_json, load_avg, machine, print_table, setup_torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv: list[str] | None = None):
    ap = base_parser(__doc__)
    ap.add_argument("--texts", type=int, default=None, help="texts to score (default 256, quick 64)")
    ap.add_argument("--batch", type=int, default=16, help="batch size of both ways (the product's default)")
    ap.add_argument("--task", default="rotten_tomatoes")
    ap.add_argument("--threads", type=int, default=0, help="torch compute threads (default 0: torch's choice)")
    return ap.parse_args(argv)


def naive_label_logits(llm, task, texts: list[str], batch: int) -> torch.Tensor:
    """The way before 2026-12-02: given order, full logits at every position, then the last row's."""
    from crosslm_server.method.prompts import classification_prompt, pad_right, verbalizer_ids

    verb = verbalizer_ids(llm.tokenizer, task)
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            rows = [llm.tokenizer(classification_prompt(llm.tokenizer, task, t), add_special_tokens=False)["input_ids"][-192:]
                    for t in texts[i:i + batch]]
            ids, mask = pad_right(rows, llm.tokenizer.pad_token_id, llm.device)
            logits = llm.model(input_ids=ids, attention_mask=mask).logits
            out.append(logits[torch.arange(len(rows)), mask.sum(1) - 1][:, verb].float().cpu())
    return torch.cat(out)


def naive_gen_terms(model, batch, advantage):
    """L_gen and KL the way before 2026-12-02: full logits at every position, adapter on and off."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    target, mask = batch.input_ids[:, 1:], batch.gen_mask[:, 1:].float()
    logp = torch.log_softmax(logits, -1)
    seq = (logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask).sum(1) / mask.sum(1).clamp(min=1)
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
        base_logp = torch.log_softmax(base, -1)
    kl = ((logp.exp() * (logp - base_logp)).sum(-1) * mask).sum() / mask.sum().clamp(min=1)
    return -(advantage * seq).mean(), kl


def time_step(model, terms) -> tuple[float, tuple[float, float, float]]:
    """Seconds for one L_gen + KL forward and backward; (L_gen, KL, gradient norm)."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    l_gen, kl = terms()
    (l_gen + kl).backward()
    seconds = time.perf_counter() - start
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return seconds, (float(l_gen.detach()), float(kl.detach()), float(grad.norm()))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load0 = load_avg()
    setup_torch(args.threads)
    from crosslm_server.method.llm import LLMConfig, load_llm
    from crosslm_server.method.prompts import batched_label_logits
    from crosslm_shared.data import load_examples, shuffled
    from crosslm_shared.tasks import load_task

    n = args.texts or (64 if args.quick else 256)
    llm = load_llm(LLMConfig())
    llm.model.eval()
    task = load_task(args.task)
    texts = list(shuffled(load_examples(task), 0).texts[:n])

    def timed(fn) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        result = fn()
        return len(texts) / (time.perf_counter() - start), result

    fn_naive = lambda: naive_label_logits(llm, task, texts, args.batch)  # noqa: E731
    fn_ours = lambda: batched_label_logits(llm, task, texts, batch_size=args.batch)  # noqa: E731
    timed(lambda: batched_label_logits(llm, task, texts[:args.batch], batch_size=args.batch))  # warm-up
    # naive first and last, the better of the two is the baseline (load only slows)
    naive_first, ref = timed(fn_naive)
    ours, got = timed(fn_ours)
    naive_last, _ = timed(fn_naive)
    naive = max(naive_first, naive_last)
    diff = float((ref - got).abs().max())
    agree = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    print(f"{len(texts)} texts of {args.task}, batch {args.batch}, {torch.get_num_threads()} threads")
    print_table(["way", "texts/s", "vs naive"],
                [["naive: given order, logits at every position", round(naive, 2), 1.0],
                 ["product: length-sorted, shared prefix cached, last position", round(ours, 2), round(ours / naive, 2)]],
                title="the LLM's label logits")
    print(f"largest logit difference {diff:.2e}; the answers agree on {100 * agree:.1f} % of texts")
    sys.stdout.flush()

    from crosslm_server.method.llm_update import build_gen_batch, gen_terms
    from crosslm_server.method.prompts import generation_prompt

    labels = list(shuffled(load_examples(task), 0).labels[:8])
    prompts = [generation_prompt(llm.tokenizer, task, y, i) for i, y in enumerate(labels)]
    batch = build_gen_batch(llm.tokenizer, prompts, [" ".join(t.split()[:30]) for t in texts[:8]], task.closing_mark,
                            max_length=192, device=llm.device)
    adv = torch.linspace(-1, 1, len(labels), device=llm.device)
    with torch.no_grad():  # an adapter that has learned something, so the KL is not zero
        for name, p in llm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator(p.device).manual_seed(0))
    llm.model.train()
    runs = {"naive": [], "product": []}
    for way, terms in [("naive", lambda: naive_gen_terms(llm.model, batch, adv)),
                       ("product", lambda: gen_terms(llm.model, batch, adv, with_kl=True))] * 2:
        runs[way].append(time_step(llm.model, terms))
    step_naive, step_ours = (min(s for s, _ in runs[w]) for w in ("naive", "product"))
    (n_gen, n_kl, n_grad), (o_gen, o_kl, o_grad) = runs["naive"][0][1], runs["product"][0][1]
    print_table(["way", "s per step", "vs naive"],
                [["naive: full logits everywhere, adapter on and off", round(step_naive, 2), 1.0],
                 ["product: generated positions only, shared prefix cached", round(step_ours, 2),
                  round(step_naive / step_ours, 2)]],
                title=f"LoRA step, L_gen + KL, batch {len(labels)}, forward and backward")
    print(f"L_gen {n_gen:.6f} vs {o_gen:.6f}, KL {n_kl:.6f} vs {o_kl:.6f}, grad norm {n_grad:.6f} vs {o_grad:.6f}")
    emit_json({"script": "llm_passes", "quick": args.quick, "task": args.task, "texts": len(texts),
               "batch": args.batch, "naive_texts_per_s": round(naive, 3),
               "naive_first_last_texts_per_s": [round(naive_first, 3), round(naive_last, 3)],
               "texts_per_s": round(ours, 3), "speedup_vs_naive": round(ours / naive, 3),
               "max_logit_diff": diff, "answers_agree": agree, "step_naive_s": round(step_naive, 3),
               "step_s": round(step_ours, 3), "step_speedup_vs_naive": round(step_naive / step_ours, 3),
               "step_loss_diff": abs(n_gen - o_gen) + abs(n_kl - o_kl), "torch_threads": torch.get_num_threads(),
               "machine": machine(started_load=load0)}, args.out)


if __name__ == "__main__":
    main()
