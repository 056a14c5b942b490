"""PNG plots of a study (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def study_plots(summary: dict, out: Path) -> list[str]:
    paths = [_arms(summary, out / "study_arms.png"), _per_silo(summary, out / "study_per_silo.png")]
    if summary["curves"]:
        paths.append(_curves(summary, out / "study_rounds.png"))
    return [str(p) for p in paths]


def _arms(summary: dict, path: Path) -> Path:
    arms = [a for a, s in summary["arms"].items() if s["n"]]
    means = [100 * summary["arms"][a]["mean"] for a in arms]
    stds = [100 * summary["arms"][a]["std"] for a in arms]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(arms)), 4))
    colors = ["#999999" if a in ("silo_only", "zerogen") else "#1f77b4" for a in arms]
    ax.bar(arms, means, yerr=stds, color=colors, capsize=4)
    ax.set_ylabel("SLM test accuracy, mean over silos (%)")
    ax.set_title(f"Arms over seeds {summary['seeds']} (mean ± std)")
    lo = min(means) - max(stds + [1]) - 3
    ax.set_ylim(max(0, lo), min(100, max(means) + max(stds + [1]) + 3))
    ax.tick_params(axis="x", rotation=30)
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
    ax.set_xlabel("round (0 = silo-only)")
    ax.set_ylabel("SLM test accuracy, mean over silos (%)")
    ax.set_title("Per-round SLM accuracy")
    ax.set_xticks(range(len(next(iter(summary["curves"].values()))["mean"])))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
