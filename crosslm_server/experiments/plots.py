"""PNG plots of a study (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def study_plots(summary: dict, out: Path) -> list[str]:
    if not any(s["n"] for s in summary["arms"].values()):  # nothing has finished yet: nothing to draw
        return []
    paths = [_arms(summary, out / "study_arms.png"), _per_silo(summary, out / "study_per_silo.png")]
    if summary["curves"]:
        paths.append(_curves(summary, out / "study_rounds.png"))
    return [str(p) for p in paths]


def _arms(summary: dict, path: Path) -> Path:
    """One horizontal bar per arm (long arm names stay readable), baselines grey, each bar
    labelled with its mean and how many seeds it holds (candidate arms may have fewer)."""
    arms = [a for a, s in summary["arms"].items() if s["n"]]
    means = [100 * summary["arms"][a]["mean"] for a in arms]
    stds = [100 * summary["arms"][a]["std"] for a in arms]
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.45 * len(arms)))
    y = np.arange(len(arms))[::-1]
    colors = ["#999999" if a == "silo_only" or a.startswith("zerogen") else "#1f77b4" for a in arms]
    ax.barh(y, means, xerr=stds, color=colors, capsize=3)
    ax.set_yticks(y, arms)
    ax.set_xlabel("SLM test accuracy, mean over silos (%)")
    ax.set_title(f"Arms over seeds {summary['seeds']}: mean ± std (grey: baselines)", fontsize=10)
    lo = min(m - sd for m, sd in zip(means, stds)) - 3
    ax.set_xlim(max(0, lo), min(100, max(m + sd for m, sd in zip(means, stds)) + 2))
    for yi, m, a in zip(y, means, arms):  # at the bar's foot: error bars may cross its end or the axis
        ax.text(ax.get_xlim()[0] + 0.3, yi, f"{m:.1f} (n={summary['arms'][a]['n']})", va="center", fontsize=8,
                color="white")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _per_silo(summary: dict, path: Path) -> Path:
    silos = list(summary["per_silo"])
    arms = ["silo_only", "zerogen", "crosslm"]
    x = np.arange(len(silos))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(silos)), 4))
    for i, arm in enumerate(arms):
        vals = [100 * summary["per_silo"][s][arm]["mean"] for s in silos]
        errs = [100 * summary["per_silo"][s][arm]["std"] for s in silos]
        ax.bar(x + (i - 1) * width, vals, width, yerr=errs, capsize=3, label=arm)
    ax.set_xticks(x, [f"{s}\n({Path(summary['per_silo'][s]['arch']).name})" for s in silos])
    ax.set_ylabel("SLM test accuracy (%)")
    ax.set_title("Per silo: silo-only vs ZeroGen vs CrossLM (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _curves(summary: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, c in summary["curves"].items():
        mean, std = np.asarray(c["mean"]) * 100, np.asarray(c["std"]) * 100
        rounds = np.arange(len(mean))
        ax.plot(rounds, mean, marker="o", label=arm)
        ax.fill_between(rounds, mean - std, mean + std, alpha=0.15)
    zerogen = summary["arms"].get("zerogen", {})
    if zerogen.get("n"):  # ZeroGen has no rounds: its final level, same synthetic budget
        ax.axhline(zerogen["mean"] * 100, color="grey", linestyle="--", label="zerogen (final, same budget)")
    ax.set_xlabel("round (0 = silo-only)")
    ax.set_ylabel("SLM test accuracy, mean over silos (%)")
    ax.set_title("Per-round SLM accuracy")
    ax.set_xticks(range(len(next(iter(summary["curves"].values()))["mean"])))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report_plots(report: dict, out: Path) -> list[str]:
    """The simulate/demo report's figures: SLMs per silo per round, the LLM per round, the filter."""
    rounds = report["rounds"]
    if not rounds:
        return []
    paths = []
    # SLM accuracy per silo per round, against its silo-only and ZeroGen baselines
    fig, ax = plt.subplots(figsize=(7, 4.2))
    zg = report.get("baselines", {}).get("zerogen", {}).get("silos", {})
    for i, (name, s) in enumerate(report["silos"].items()):
        color = f"C{i}"
        xs = list(range(len(s["acc_after"]) + 1))
        ax.plot(xs, [100 * s["acc_local"]] + [100 * a for a in s["acc_after"]], marker="o", color=color,
                label=f"{name} ({Path(s['arch']).name})")
        ax.axhline(100 * s["acc_local"], color=color, linestyle=":", linewidth=1)
        if name in zg:
            ax.scatter([xs[-1] + 0.15], [100 * zg[name]["acc"]], marker="x", color=color)
    ax.set_xlabel("round (0 = silo-only; dotted = silo-only level" + ("; x = ZeroGen)" if zg else ")"))
    ax.set_ylabel("SLM test accuracy (%)")
    ax.set_title("SLM accuracy per silo per round")
    ax.set_xticks(range(len(rounds) + 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out / "slm_per_round.png"))
    # LLM zero-shot accuracy and perplexity per round
    llm = report["llm"]
    xs = list(range(len(rounds) + 1))
    acc = [100 * llm["acc_before"]] + [100 * r["llm"]["acc"] for r in rounds]
    ppl = [llm["ppl_before"]] + [r["llm"]["ppl"] for r in rounds]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(xs, acc, marker="o", color="C0", label="zero-shot accuracy (raw)")
    ax.set_xlabel("round (0 = before)")
    ax.set_ylabel("LLM zero-shot accuracy (%)", color="C0")
    ax.set_xticks(xs)
    ax2 = ax.twinx()
    ax2.plot(xs, ppl, marker="s", color="C3", label="perplexity (general corpus)")
    ax2.set_ylabel("perplexity", color="C3")
    notes = [f"judge on-label: {100 * llm['on_label_before']:.1f} % → {100 * llm['on_label_after']:.1f} %"
             if "on_label_before" in llm else "",
             f"{llm['eval_texts']} test texts, {llm['eval_docs']} perplexity documents" if "eval_texts" in llm else ""]
    notes = [n for n in notes if n]
    ax.set_title("LLM per round" + (f" ({'; '.join(notes)})" if notes else ""))
    fig.legend(loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    paths.append(_save(fig, out / "llm_per_round.png"))
    # kept fraction and reward histogram per round
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    bars = a1.bar([r["round"] for r in rounds], [100 * r["kept"] / max(1, r["generated"]) for r in rounds], color="C2")
    a1.bar_label(bars, labels=[f"{r['kept']} of {r['generated']}" for r in rounds], padding=2)
    a1.margins(y=0.12)
    a1.set_xlabel("round")
    a1.set_ylabel("kept / generated (%)")
    a1.set_title("Filter: kept fraction")
    a1.set_xticks([r["round"] for r in rounds])
    edges = np.linspace(-1, 1, 11)
    centers = (edges[:-1] + edges[1:]) / 2
    width = 0.2 / (len(rounds) + 1)
    for k, r in enumerate(rounds):
        hist = np.sum([s["reward_hist"] for s in r["silos"].values()], axis=0)
        a2.bar(centers + (k - (len(rounds) - 1) / 2) * width, hist, width, label=f"round {r['round']}")
    a2.set_xlabel("reward r = 2·S(y|x) − 1")
    a2.set_ylabel("samples")
    a2.set_title("Reward histogram")
    a2.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out / "filter_rewards.png"))
    return [str(p) for p in paths]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
