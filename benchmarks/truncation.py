"""Generations that end: how many of the real LLM's texts hit the token cap, per task, before and after.

    .venv/bin/python benchmarks/truncation.py [--quick] [--per-task 48] [--tasks rotten_tomatoes,sms_spam,trec]

SmolLM2-135M (the server's LLM, adapter untouched) writes ``--per-task`` texts for each task, labels
and templates in turn, with the round's generation (``crosslm_server.method.generate``), twice on the
same seed: with the baseline settings (``--baseline``, default the cap of 40 new tokens the example
configs had until 2026-12-07, stopping at the closing mark only) and with the settings of
``--config``'s ``[round.generate]``. Per task and setting: the truncation rate (texts that hit the
cap before they ended; goal <= 5 %), how the texts ended, what was repaired or dropped, new tokens
per text and the seconds it took. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace

from _common import REPO, base_parser, emit_json, load_avg, machine, print_table, setup_torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
GOAL = 0.05
BASELINE = "max_new_tokens=40,sentence_stop=0,stop_at_newline=false,truncated=keep"


def parse_args(argv: list[str] | None = None):
    ap = base_parser(__doc__)
    ap.add_argument("--config", default=str(REPO / "examples" / "rt-4silo.toml"),
                    help="its [round.generate] is the setting measured (default: %(default)s)")
    ap.add_argument("--baseline", default=BASELINE,
                    help="round.generate overrides of the baseline, comma-separated (default: %(default)s)")
    ap.add_argument("--tasks", default="rotten_tomatoes,sms_spam,trec", help="comma-separated task names")
    ap.add_argument("--per-task", type=int, default=None, help="texts per task and setting (default 48, quick 12)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch compute threads (default 0: torch's choice)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load0 = load_avg()
    setup_torch(args.threads)
    import torch

    from crosslm_server.method.config import load_config
    from crosslm_server.method.generate import ENDS, generate
    from crosslm_server.method.llm import load_llm
    from crosslm_shared.tasks import load_task

    after = load_config(args.config).round.generate
    before = load_config(args.config, [f"round.generate.{kv}" for kv in args.baseline.split(",") if kv]).round.generate
    n = args.per_task or (12 if args.quick else 48)
    llm = load_llm(load_config(args.config).llm)
    rows, result = [], {}
    for name in args.tasks.split(","):
        task = load_task(name)
        per_label = max(1, n // task.num_labels)
        for setting, gcfg in (("baseline", before), ("config", after)):
            t = time.perf_counter()
            gen = generate(llm, task, replace(gcfg, per_label=per_label), seed=args.seed)
            st = gen.stats()
            fig = {"generated": gen.generated, "truncated": st["truncated"], "truncated_rate": round(st["truncated_rate"], 4),
                   "repaired": st["repaired"], "dropped": st["dropped_truncated"],
                   **{f"end_{e}": st[f"end_{e}"] for e in ENDS},
                   "max_new_tokens": st["max_new_tokens"], "sentence_stop": st["sentence_stop"],
                   "new_tokens_per_text": round(gen.new_tokens / max(1, gen.generated), 1),
                   "seconds": round(time.perf_counter() - t, 1)}
            result[f"{name}_{setting}"] = fig
            rows.append([name, setting, fig["max_new_tokens"], fig["sentence_stop"], fig["generated"],
                         f"{100 * fig['truncated_rate']:.1f} %", fig["repaired"], fig["dropped"],
                         " ".join(f"{e} {fig[f'end_{e}']}" for e in ENDS if fig[f"end_{e}"]),
                         fig["new_tokens_per_text"], fig["seconds"]])
            print(f"{name} {setting}: {fig}", file=sys.stderr, flush=True)
    print_table(["task", "setting", "cap", "sentence stop", "texts", "truncated", "repaired", "dropped", "ended by",
                 "new tokens/text", "s"], rows, title="generations that hit the cap before they ended")
    worst = max(v["truncated_rate"] for k, v in result.items() if k.endswith("_config"))
    print(f"worst truncation rate with the config: {100 * worst:.1f} %, goal <= {100 * GOAL:.0f} %: "
          f"{'met' if worst <= GOAL else 'MISSED'}")
    emit_json({"script": "truncation", "quick": args.quick, "config": args.config, "baseline": args.baseline,
               "per_task": n, "seed": args.seed, "tasks": result, "worst_truncation_rate": worst,
               "goal_met": worst <= GOAL, "torch_threads": torch.get_num_threads(),
               "machine": machine(started_load=load0)}, args.out)


if __name__ == "__main__":
    main()
