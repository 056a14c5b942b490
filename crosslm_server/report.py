"""report.json (the schema other tools read) and report.md (the same figures for people)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REQUIRED_SILO_KEYS = ("arch", "n_private", "acc_local", "acc_after")
REQUIRED_LLM_KEYS = ("acc_before", "acc_after", "ppl_before", "ppl_after", "on_label_before", "on_label_after")
REQUIRED_ROUND_KEYS = ("generated", "kept", "reward_mean", "kl", "distinct_2", "truncated", "seconds_per_stage")


def check_schema(report: dict) -> list[str]:
    """Names of the required keys the report lacks (empty when complete)."""
    missing = []
    for name, silo in report.get("silos", {}).items():
        missing += [f"silos.{name}.{k}" for k in REQUIRED_SILO_KEYS if k not in silo]
    missing += [f"llm.{k}" for k in REQUIRED_LLM_KEYS if k not in report.get("llm", {})]
    for i, rnd in enumerate(report.get("rounds", [])):
        missing += [f"rounds[{i}].{k}" for k in REQUIRED_ROUND_KEYS if k not in rnd]
    if "zerogen" not in report.get("baselines", {}):
        missing.append("baselines.zerogen")
    if not report.get("silos"):
        missing.append("silos")
    if not report.get("rounds"):
        missing.append("rounds")
    return missing


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def render_markdown(report: dict) -> str:
    zg = report.get("baselines", {}).get("zerogen", {}).get("silos", {})
    lines = [f"# CrossLM simulation: {report['task']} (seed {report['seed']})", "",
             "## SLM test accuracy per silo (%)", "",
             "| silo | arch | private examples | silo-only | ZeroGen | " +
             " | ".join(f"CrossLM r{i + 1}" for i in range(len(report["rounds"]))) + " | gain vs silo-only |",
             "|---|---|---|---|---|" + "---|" * len(report["rounds"]) + "---|"]
    gains = []
    for name, s in report["silos"].items():
        after = s["acc_after"]
        gain = after[-1] - s["acc_local"] if after else float("nan")
        gains.append(gain)
        zgs = _pct(zg[name]["acc"]) if name in zg else "–"
        lines.append(f"| {name} | {s['arch']} | {s['n_private']} | {_pct(s['acc_local'])} | {zgs} | " +
                     " | ".join(_pct(a) for a in after) + f" | {100 * gain:+.1f} |")
    mean_local = np.mean([s["acc_local"] for s in report["silos"].values()])
    mean_after = np.mean([s["acc_after"][-1] for s in report["silos"].values()])
    mean_zg = np.mean([v["acc"] for v in zg.values()]) if zg else float("nan")
    lines += ["", f"Mean: silo-only {_pct(mean_local)}, ZeroGen {_pct(mean_zg)}, CrossLM {_pct(mean_after)} "
              f"({100 * (mean_after - mean_local):+.1f} points vs silo-only, {100 * (mean_after - mean_zg):+.1f} vs ZeroGen).",
              "", "## LLM", "", "| figure | before | after |", "|---|---|---|"]
    llm = report["llm"]
    lines += [f"| zero-shot accuracy (raw) | {_pct(llm['acc_before'])} % | {_pct(llm['acc_after'])} % |",
              f"| predicted-label rates | {_rates(llm.get('pred_rate_before'))} | {_rates(llm.get('pred_rate_after'))} |",
              f"| judge on-label rate of generations | {_pct(llm['on_label_before'])} % | {_pct(llm['on_label_after'])} % |",
              f"| perplexity, general corpus | {llm['ppl_before']:.2f} | {llm['ppl_after']:.2f} "
              f"({100 * (llm['ppl_after'] / llm['ppl_before'] - 1):+.1f} %) |",
              "", "## Rounds", "",
              "| round | generated | kept | kept % | reward mean | KL | distinct-2 | truncated | LLM acc | ppl | s generate | s score | s update LLM | s enhance SLM |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rnd in report["rounds"]:
        st = rnd["seconds_per_stage"]
        lines.append(f"| {rnd['round']} | {rnd['generated']} | {rnd['kept']} | {_pct(rnd['kept'] / max(1, rnd['generated']))} | "
                     f"{rnd['reward_mean']:.3f} | {rnd['kl']:.4f} | {rnd['distinct_2']:.3f} | {rnd['truncated']} | "
                     f"{_pct(rnd['llm']['acc'])} | {rnd['llm']['ppl']:.2f} | {st['generate']:.0f} | {st['score']:.0f} | "
                     f"{st['update_llm']:.0f} | {st['enhance_slm']:.0f} |")
    timing = report.get("timing", {})
    lines += ["", "## Time (s)", "", " · ".join(f"{k}: {v:.0f}" for k, v in timing.items()), ""]
    return "\n".join(lines)


def _rates(rates: dict | None) -> str:
    if not rates:
        return "–"
    return ", ".join(f"{k} {_pct(v)} %" for k, v in rates.items())


def write_report(report: dict, out: Path) -> None:
    from crosslm_server.plots import report_plots

    report["plots"] = [Path(p).name for p in report_plots(report, out)]
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    md = render_markdown(report)
    md += "\n## Plots\n\n" + "\n".join(f"![{Path(p).stem}]({p})" for p in report["plots"]) + "\n"
    (out / "report.md").write_text(md)
