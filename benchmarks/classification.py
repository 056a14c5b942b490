"""The LLM as a classifier (zero-shot accuracy, the filter's judgement): naive vs the product's way.

    .venv/bin/python benchmarks/classification.py [--quick] [--texts 256] [--threads 1]

SmolLM2-135M with its LoRA adapter scores each text by the logits of the labels' verbalizer
tokens after the classification prompt (``crosslm_server.prompts``). Every evaluation of the
LLM (400 test texts per snapshot in the study) and every filter batch with ``llm_weight`` runs
this. Naive: texts batched in their given order, the full-vocabulary logits of every position
(batch x length x 49k floats). The product: batches of texts of similar length, the prompt's
tokens every row of a batch shares (chat template, instruction) run once as a KV cache, and only
each row's last position goes through the LM head. Same texts (the task's public examples), same
batch size; the answers must agree (checked: the largest logit difference is printed). Prints a
table and, last, one JSON line.
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
    from crosslm_server.prompts import classification_prompt, pad_right, verbalizer_ids

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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load0 = load_avg()
    setup_torch(args.threads)
    from crosslm_server.llm import LLMConfig, load_llm
    from crosslm_server.prompts import batched_label_logits
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
    emit_json({"script": "classification", "quick": args.quick, "task": args.task, "texts": len(texts),
               "batch": args.batch, "naive_texts_per_s": round(naive, 3),
               "naive_first_last_texts_per_s": [round(naive_first, 3), round(naive_last, 3)],
               "texts_per_s": round(ours, 3), "speedup_vs_naive": round(ours / naive, 3),
               "max_logit_diff": diff, "answers_agree": agree, "torch_threads": torch.get_num_threads(),
               "machine": machine(started_load=load0)}, args.out)


if __name__ == "__main__":
    main()
