"""report.json (the schema other tools read) and report.md (the same figures for people).

Two kinds share the schema: ``simulate`` (every arm in one process, with the ZeroGen baseline and
the independent judge) and ``demo`` (`crosslm demo`: the service over the wire, figures from the
silos' daemons and the server's engine; no ZeroGen, no judge).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REQUIRED_SILO_KEYS = ("arch", "n_private", "acc_local", "acc_after")
REQUIRED_LLM_KEYS = ("acc_before", "acc_after", "ppl_before", "ppl_after")
JUDGE_LLM_KEYS = ("on_label_before", "on_label_after")  # simulate only: the independent judge
REQUIRED_ROUND_KEYS = ("generated", "kept", "reward_mean", "kl", "distinct_2", "truncated", "seconds_per_stage")


def check_schema(report: dict) -> list[str]:
    """Names of the required keys the report lacks (empty when complete)."""
    missing = []
    simulate = report.get("kind", "simulate") == "simulate"
    for name, silo in report.get("silos", {}).items():
        missing += [f"silos.{name}.{k}" for k in REQUIRED_SILO_KEYS if k not in silo]
    llm_keys = REQUIRED_LLM_KEYS + (JUDGE_LLM_KEYS if simulate else ())
    missing += [f"llm.{k}" for k in llm_keys if k not in report.get("llm", {})]
    for i, rnd in enumerate(report.get("rounds", [])):
        missing += [f"rounds[{i}].{k}" for k in REQUIRED_ROUND_KEYS if k not in rnd]
    zerogen = report.get("config", {}).get("zerogen", True)  # `zerogen = false` runs no ZeroGen arm
    if simulate and zerogen and "zerogen" not in report.get("baselines", {}):
        missing.append("baselines.zerogen")
    if not report.get("silos"):
        missing.append("silos")
    if not report.get("rounds"):
        missing.append("rounds")
    return missing


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def final_acc(silo: dict) -> float:
    """A silo's SLM test accuracy at the end of a run: after the final pool sync if it ran, else
    after the last round."""
    return silo.get("acc_final", silo["acc_after"][-1])


def _privacy_lines(report: dict) -> list[str]:
    """ε spent per DP silo and the audit AUC of each model sent (docs/privacy.md); nothing otherwise."""
    lines = []
    dp = {n: s["privacy"] for n, s in report["silos"].items() if s.get("privacy", {}).get("dp")}
    if dp:
        lines += ["", "DP-SGD on the private records (ε spent of the silo's budget, δ, Opacus accountant): " +
                  ", ".join(f"{n} ε = {p['epsilon']:.2f} of {p['epsilon_budget']:g} (δ = {p['delta']:g}, "
                            f"{p['accountant']})" for n, p in dp.items()) + "; other silos: no DP."]
    audits = {n: s["audit"] for n, s in report["silos"].items() if s.get("audit")}
    if audits:
        lines += ["", "Membership-inference audit of each model sent (loss attack; AUC, 0.5 = chance): " +
                  ", ".join(f"{n} " + " / ".join(f"{a['auc']:.3f}" for a in runs) for n, runs in audits.items()) + "."]
    return lines


def render_markdown(report: dict) -> str:
    zg = report.get("baselines", {}).get("zerogen", {}).get("silos", {})
    title = report.get("title") or f"CrossLM simulation: {report['task']} (seed {report['seed']})"
    zg_head, zg_rule = ("ZeroGen | ", "---|") if zg else ("", "")
    synced = all("acc_final" in s for s in report["silos"].values()) and bool(report["silos"])
    lines = [f"# {title}", "", "## SLM test accuracy per silo (%)", "",
             "| silo | arch | private examples | silo-only | " + zg_head +
             " | ".join(f"CrossLM r{i + 1}" for i in range(len(report["rounds"]))) +
             (" | final pool sync" if synced else "") + " | gain vs silo-only |",
             "|---|---|---|---|" + zg_rule + "---|" * (len(report["rounds"]) + synced) + "---|"]
    for name, s in report["silos"].items():
        after = s["acc_after"] + ([s["acc_final"]] if synced else [])
        gain = final_acc(s) - s["acc_local"] if after else float("nan")
        zgs = (_pct(zg[name]["acc"]) if name in zg else "–") + " | " if zg else ""
        lines.append(f"| {name} | {s['arch']} | {s['n_private']} | {_pct(s['acc_local'])} | {zgs}" +
                     " | ".join(_pct(a) for a in after) + f" | {100 * gain:+.1f} |")
    mean_local = np.mean([s["acc_local"] for s in report["silos"].values()])
    mean_after = np.mean([final_acc(s) for s in report["silos"].values()])
    if zg:
        mean_zg = np.mean([v["acc"] for v in zg.values()])
        mean = (f"Mean: silo-only {_pct(mean_local)}, ZeroGen {_pct(mean_zg)}, CrossLM {_pct(mean_after)} "
                f"({100 * (mean_after - mean_local):+.1f} points vs silo-only, "
                f"{100 * (mean_after - mean_zg):+.1f} vs ZeroGen).")
    else:
        mean = (f"Mean: silo-only {_pct(mean_local)}, CrossLM {_pct(mean_after)} "
                f"({100 * (mean_after - mean_local):+.1f} points vs silo-only).")
    lines += ["", mean, *_privacy_lines(report), "", "## LLM", "", "| figure | before | after |", "|---|---|---|"]
    llm = report["llm"]
    judge = ([f"| judge on-label rate of generations | {_pct(llm['on_label_before'])} % | "
              f"{_pct(llm['on_label_after'])} % |"] if "on_label_before" in llm else [])
    # what a constant answer cannot fake on a skewed test set (SMS: 9 in 10 are ham)
    balanced = ([f"| zero-shot balanced accuracy (constant answer: {_pct(1 / len(llm['pred_rate_before']))} %) | "
                 f"{_pct(llm['balanced_acc_before'])} % | {_pct(llm['balanced_acc_after'])} % |"]
                if "balanced_acc_before" in llm and "balanced_acc_after" in llm else [])
    lines += [f"| zero-shot accuracy (raw) | {_pct(llm['acc_before'])} % | {_pct(llm['acc_after'])} % |",
              f"| predicted-label rates | {_rates(llm.get('pred_rate_before'))} | {_rates(llm.get('pred_rate_after'))} |",
              *balanced, *judge,
              f"| perplexity, general corpus | {llm['ppl_before']:.2f} | {llm['ppl_after']:.2f} "
              f"({100 * (llm['ppl_after'] / llm['ppl_before'] - 1):+.1f} %) |",
              "", "## Rounds", "",
              "| round | generated | kept | kept % | reward mean | KL | distinct-2 | truncated | LLM acc | ppl | s generate | s score | s update LLM | s enhance SLM |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rnd in report["rounds"]:
        st = rnd["seconds_per_stage"]
        lines.append(f"| {rnd['round']} | {rnd['generated']} | {rnd['kept']} | {_pct(rnd['kept'] / max(1, rnd['generated']))} | "
                     f"{rnd['reward_mean']:.3f} | {rnd['kl']:.4f} | {rnd['distinct_2']:.3f} | {_truncated(rnd)} | "
                     f"{_pct(rnd['llm']['acc'])} | {rnd['llm']['ppl']:.2f} | {st['generate']:.0f} | {st['score']:.0f} | "
                     f"{st['update_llm']:.0f} | {st['enhance_slm']:.0f} |")
    timing = report.get("timing", {})
    lines += ["", "## Time (s)", "", " · ".join(f"{k}: {v:.0f}" for k, v in timing.items()), ""]
    return "\n".join(lines)


def _truncated(rnd: dict) -> str:
    """Texts that hit the cap, with their share of the round's generations where the report has it."""
    rate = rnd.get("truncated_rate")
    return f"{rnd['truncated']} ({_pct(rate)} %)" if rate is not None else f"{rnd['truncated']}"


def _rates(rates: dict | None) -> str:
    if not rates:
        return "–"
    return ", ".join(f"{k} {_pct(v)} %" for k, v in rates.items())


def write_report(report: dict, out: Path) -> None:
    from crosslm_server.experiments.plots import report_plots

    report["plots"] = [Path(p).name for p in report_plots(report, out)]
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    md = render_markdown(report)
    md += "\n## Plots\n\n" + "\n".join(f"![{Path(p).stem}]({p})" for p in report["plots"]) + "\n"
    (out / "report.md").write_text(md)
