"""Generation throughput of the real offline LLM: one prompt at a time vs batched.

Same prompts, same number of new tokens (stopping disabled: every sequence produces exactly
``--tokens`` tokens), so tokens/s compare like for like. Also times LoRA training steps.
Prints a table and, last, one JSON line. Run: python benchmarks/generation.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer prompts and tokens (<= 3 minutes on 2 cores)")
    ap.add_argument("--batches", default="8,16,32", help="batch sizes to compare with one-at-a-time")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per prompt (default 32, quick 16)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per measurement (default 32, quick 32)")
    args = ap.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from crosslm_server.llm import LLMConfig, load_llm
    from crosslm_server.llm_update import UpdateConfig, update_llm
    from crosslm_server.prompts import generation_prompt
    from crosslm_shared.tasks import load_task

    tokens = args.tokens or (16 if args.quick else 32)
    n_prompts = args.prompts or 32
    naive_prompts = 4 if args.quick else 8  # one-at-a-time is slow; its tokens/s needs few prompts
    llm = load_llm(LLMConfig())
    task = load_task("rotten_tomatoes")
    prompts = [generation_prompt(llm.tokenizer, task, i % 2, i) for i in range(n_prompts)]
    tok = llm.tokenizer

    @torch.no_grad()
    def run(batch: list[str]) -> int:
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(llm.device)
        out = llm.model.generate(**enc, do_sample=True, top_p=0.9, max_new_tokens=tokens, min_new_tokens=tokens,
                                 pad_token_id=tok.pad_token_id, use_cache=True)
        return (out.shape[1] - enc["input_ids"].shape[1]) * len(batch)

    def measure(bs: int, prompts_: list[str]) -> float:
        run(prompts_[:bs])  # warm-up
        start, n = time.perf_counter(), 0
        for i in range(0, len(prompts_), bs):
            n += run(prompts_[i:i + bs])
        return n / (time.perf_counter() - start)

    rows = [("naive (1 prompt at a time)", 1, measure(1, prompts[:naive_prompts]))]
    for bs in [int(b) for b in args.batches.split(",")]:
        rows.append((f"batched {bs}", bs, measure(bs, prompts)))
    naive = rows[0][2]

    texts = ["A quietly moving film with a superb central performance."] * 8
    labels = [1] * 8
    gen_prompts = [generation_prompt(tok, task, 1, i) for i in range(8)]
    cfg = UpdateConfig(batch_size=8, epochs=1)
    steps = 1 if args.quick else 3
    update_llm(llm, task, gen_prompts, texts, labels, [0.5] * 8, list(range(8)), cfg, seed=0)  # warm-up
    start = time.perf_counter()
    for s in range(steps):
        update_llm(llm, task, gen_prompts, texts, labels, [0.5] * 8, list(range(8)), cfg, seed=s)
    step_s = (time.perf_counter() - start) / steps

    print(f"device: {llm.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"{'mode':<30}{'batch':>6}{'tokens/s':>12}{'vs naive':>10}")
    for name, bs, tps in rows:
        print(f"{name:<30}{bs:>6}{tps:>12.1f}{tps / naive:>9.1f}x")
    print(f"LoRA step (batch 8, L_gen + L_task + KL): {step_s:.2f} s/step, {8 / step_s:.2f} samples/s")
    result = {"device": str(llm.device), "tokens_per_prompt": tokens, "naive_tokens_per_s": naive,
              **{f"batched_{bs}_tokens_per_s": tps for _, bs, tps in rows[1:]},
              **{f"batched_{bs}_vs_naive": tps / naive for _, bs, tps in rows[1:]},
              "batched_vs_naive": rows[-1][2] / naive, "lora_step_s": step_s}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
