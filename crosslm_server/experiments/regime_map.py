"""`crosslm map`: where CrossLM pays. One cell per finished study (a task at one private-data size
and round count), placed by the paper's premise: how far the silos' own SLMs are above the LLM's
zero-shot accuracy. For each cell the SLM gains against silo-only and ZeroGen with their paired
intervals, what the LLM learned, and the issue's goals met or missed (docs/when-crosslm-pays.md).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from crosslm_shared.errors import ConfigError

ARM = "crosslm"
SHORT = {"rotten_tomatoes": "RT", "sms_spam": "SMS", "trec": "TREC"}


def _config(study_dir: Path, arm: str) -> dict:
    """The run's config, from the first report of the arm (every seed of a cell shares it)."""
    for pattern in (f"runs/{arm}/seed-*/report.json", f"report-{arm}-seed-*.json"):
        for path in sorted(study_dir.glob(pattern)):
            return json.loads(path.read_text())["config"]
    raise ConfigError(f"{study_dir}: no report of arm {arm!r} (runs/{arm}/seed-N/report.json); "
                      "run `crosslm study` there first")


def _interval(c: dict) -> dict:
    return {"mean": c["mean"], "ci_low": c["ci_low"], "ci_high": c["ci_high"], "n_pairs": c.get("n_pairs")}


def cell(study_dir: Path, *, arm: str = ARM) -> dict:
    """The map's entry for one study folder (its study.json and one of its reports)."""
    path = study_dir / "study.json"
    if not path.is_file():
        raise ConfigError(f"{study_dir}: no study.json; run `crosslm study --summary-only --out {study_dir}`")
    summary = json.loads(path.read_text())
    cfg = _config(study_dir, arm)
    arms, llm = summary["arms"], summary["llm"].get(arm)
    if llm is None or not arms.get(arm, {}).get("n"):
        raise ConfigError(f"{study_dir}: arm {arm!r} has no finished seed")
    comparisons = summary["comparisons"]
    silo_only, llm_before = 100 * arms["silo_only"]["mean"], 100 * llm["acc_before"]["mean"]
    rounds = cfg["rounds"]
    quality = summary["label_quality"]
    truncation = [q["truncated_rate"]["mean"] for k, q in quality.items()
                  if k.startswith(f"{arm} r") and "truncated_rate" in q]
    from crosslm_shared.tasks import load_task

    # the judge labels judge_per_label texts of every label per seed: the rate's sampling error
    n_judged = cfg["eval"]["judge_per_label"] * load_task(cfg["task"]).num_labels * arms[arm]["n"] or None
    return {
        "study": str(study_dir), "task": summary["task"], "n_private": cfg["split"]["n_private"],
        "rounds": rounds, "seeds": arms[arm]["n"],
        "silo_only": silo_only, "zerogen": 100 * arms["zerogen"]["mean"], "crosslm": 100 * arms[arm]["mean"],
        "llm_zero_shot_before": llm_before, "premise_margin": silo_only - llm_before,
        "gain_vs_silo_only": _interval(comparisons[f"{arm}_vs_silo_only"]),
        "gain_vs_zerogen": _interval(comparisons[f"{arm}_vs_zerogen"]),
        "llm_raw": [llm_before, 100 * llm["acc_after"]["mean"]],
        "llm_balanced": [100 * llm[k]["mean"] for k in ("balanced_acc_before", "balanced_acc_after") if k in llm],
        "judge_on_label": [100 * llm[k]["mean"] for k in ("on_label_before", "on_label_after") if k in llm],
        "judge_texts": n_judged,
        "perplexity": [llm["ppl_before"]["mean"], llm["ppl_after"]["mean"]],
        "kl_per_round": [llm[f"kl_round_{r}"]["mean"] for r in range(1, rounds + 1) if f"kl_round_{r}" in llm],
        "truncated_max": 100 * max(truncation) if truncation else None,
    }


def goals(c: dict) -> dict[str, bool | None]:
    """The science issue's goals for one cell; None where the goal does not apply."""
    before, after = c["llm_raw"]
    needed = min(13.6, 0.30 * (100 - before))
    holds = c["premise_margin"] >= 5
    ppl_rise = 100 * (c["perplexity"][1] / c["perplexity"][0] - 1)
    return {
        "llm_gain_where_premise_holds": (after - before >= needed) if holds else None,
        "above_zerogen_where_premise_holds": (c["gain_vs_zerogen"]["ci_low"] > 0) if holds else None,
        "not_below_zerogen_by_1": c["gain_vs_zerogen"]["mean"] >= -1.0,
        "above_silo_only": (c["gain_vs_silo_only"]["ci_low"] > 0) if c["silo_only"] < 80 else None,
        "perplexity_rise_le_5pct": ppl_rise <= 5.0,
        "truncation_le_5pct": None if c["truncated_max"] is None else c["truncated_max"] <= 5.0,
    }


def _se(p: float, n: int | None) -> str:
    return "" if not n else f" ± {100 * math.sqrt(p / 100 * (1 - p / 100) / n):.1f}"


def render(cells: list[dict]) -> str:
    lines = ["# Where CrossLM pays: the regime map", "",
             "Premise margin: silo-only SLM accuracy minus the LLM's zero-shot accuracy (points); gains in "
             "points with paired 95 % bootstrap intervals over silo × seed pairs.", "",
             "| task | private/silo | rounds | seeds | premise | silo-only | ZeroGen | CrossLM | vs silo-only | "
             "vs ZeroGen | LLM raw | LLM balanced | judge on-label | ppl | KL/round | truncated |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        g1, g2 = c["gain_vs_silo_only"], c["gain_vs_zerogen"]
        arrow = lambda v: " → ".join(f"{x:.1f}" for x in v) if v else "–"  # noqa: E731
        truncated = "–" if c["truncated_max"] is None else f"{c['truncated_max']:.0f} %"
        judge = (arrow(c["judge_on_label"]) + _se(c["judge_on_label"][-1], c["judge_texts"])
                 if c["judge_on_label"] else "–")
        lines.append(
            f"| {c['task']} | {c['n_private']} | {c['rounds']} | {c['seeds']} | {c['premise_margin']:+.1f} | "
            f"{c['silo_only']:.1f} | {c['zerogen']:.1f} | {c['crosslm']:.1f} | "
            f"{g1['mean']:+.1f} [{g1['ci_low']:+.1f}, {g1['ci_high']:+.1f}] | "
            f"{g2['mean']:+.1f} [{g2['ci_low']:+.1f}, {g2['ci_high']:+.1f}] | {arrow(c['llm_raw'])} | "
            f"{arrow(c['llm_balanced'])} | {judge} | {c['perplexity'][0]:.2f} → {c['perplexity'][1]:.2f} | "
            f"{', '.join(f'{k:.3f}' for k in c['kl_per_round'])} | {truncated} |")
    lines += ["", "## Goals per cell (met / missed / – where it does not apply)", "",
              "| task | private/silo | " + " | ".join(goals(cells[0])) + " |" if cells else "",
              "|---|---|" + "---|" * len(goals(cells[0])) if cells else ""]
    for c in cells:
        marks = ["–" if v is None else ("met" if v else "**missed**") for v in goals(c).values()]
        lines.append(f"| {c['task']} | {c['n_private']} | " + " | ".join(marks) + " |")
    return "\n".join(lines) + "\n"


def plot(cells: list[dict], path: Path) -> Path:
    """x: the premise margin; y: each gain with its interval; one label per cell."""
    from crosslm_server.experiments.plots import plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for key, color, name, dx in (("gain_vs_silo_only", "#1f77b4", "vs silo-only", 0.0),
                                 ("gain_vs_zerogen", "#d62728", "vs ZeroGen", 0.4)):
        xs = [c["premise_margin"] + dx for c in cells]  # side by side where the bars would overlap
        ys = [c[key]["mean"] for c in cells]
        err = [[c[key]["mean"] - c[key]["ci_low"] for c in cells], [c[key]["ci_high"] - c[key]["mean"] for c in cells]]
        ax.errorbar(xs, ys, yerr=err, fmt="o", color=color, capsize=3, label=f"CrossLM {name}")
    for c in cells:
        ax.annotate(f"{SHORT.get(c['task'], c['task'])} {c['n_private']}/silo, {c['rounds']} rounds, "
                    f"{c['seeds']} seed{'s' * (c['seeds'] > 1)}",
                    (c["premise_margin"], c["gain_vs_silo_only"]["mean"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("premise margin: silo-only SLM accuracy − LLM zero-shot accuracy (points)")
    ax.set_ylabel("CrossLM SLM gain (points, 95 % paired interval)")
    ax.set_title("Where CrossLM pays: right of the dotted line the silos know more than the LLM", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_map(study_dirs: list[Path], out: Path, *, results: Path | None = None) -> list[dict]:
    cells = sorted((cell(Path(d)) for d in study_dirs), key=lambda c: c["premise_margin"])
    for c in cells:
        c["goals"] = goals(c)
    out.mkdir(parents=True, exist_ok=True)
    (out / "map.json").write_text(json.dumps(cells, indent=2) + "\n")
    (out / "map.md").write_text(render(cells))
    plot(cells, out / "map.png")
    if results is not None:
        merged = json.loads(results.read_text()) if results.exists() else {}
        merged["map"] = cells
        results.write_text(json.dumps(merged, indent=2) + "\n")
    return cells
