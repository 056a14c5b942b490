"""The study's summary: per arm the silo-mean final accuracy over seeds, paired bootstrap
intervals against the baselines and the protocol, the LLM's figures, the keep-if-better gate and
the judge's view of the synthetic data; its headline and its Markdown page (``study.md``).
Reads only the runs' ``report.json`` files (no torch).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from crosslm_server.experiments.arms import BASELINES, OWN_ZEROGEN, zerogen_of
from crosslm_server.experiments.report import final_acc
from crosslm_server.experiments.stats import mean_std, paired_bootstrap


def load_run(out: Path, arm: str, seed: int) -> dict | None:
    path = out / "runs" / arm / f"seed-{seed}" / "report.json"
    return json.loads(path.read_text()) if path.exists() else None


Reports = dict[tuple[str, int], dict]


def _finished_runs(out: Path, seeds: list[int], arms: list[str]) -> Reports:
    """The report of every finished run, keyed (arm, seed), seed by seed; the protocol's
    (crosslm) always, as every arm is compared with it."""
    found = {}
    for seed in seeds:
        for arm in dict.fromkeys(("crosslm", *arms)):
            rep = load_run(out, arm, seed)
            if rep is not None:
                found[arm, seed] = rep
    return found


def summarise(out: Path, *, seeds: list[int], arms: list[str]) -> dict:
    """Per arm the silo-mean final accuracy over seeds, per-silo figures and paired intervals."""
    own = {a: zerogen_of(a) for a in arms if a != "crosslm" and zerogen_of(a)}
    per_arm: dict[str, dict[tuple[int, str], float]] = {a: {} for a in (*BASELINES, *own.values(), *arms)}
    # an arm that ran the final pool sync, at its own last round before the sync: the same runs,
    # so the pairs say what the sync earns
    unsynced: dict[str, str] = {}
    curves: dict[str, list[list[float]]] = {a: [] for a in arms}
    llm: dict[str, list[dict]] = {a: [] for a in arms}
    archs: dict[str, str] = {}
    reports = _finished_runs(out, seeds, arms)
    for seed in seeds:
        base = reports.get(("crosslm", seed))
        if base is None:
            continue
        for silo, s in base["silos"].items():
            archs[silo] = s["arch"]
            per_arm["silo_only"][(seed, silo)] = s["acc_local"]
            per_arm["zerogen"][(seed, silo)] = base["baselines"]["zerogen"]["silos"][silo]["acc"]
        for arm in arms:
            rep = reports.get((arm, seed))
            if rep is None:
                continue
            for silo, s in rep["silos"].items():
                per_arm[arm][(seed, silo)] = final_acc(s)
                if "acc_final" in s:
                    unsynced[arm] = f"{arm.removesuffix('_sync')}_before_sync"
                    per_arm.setdefault(unsynced[arm], {})[(seed, silo)] = s["acc_after"][-1]
                if arm in own and "zerogen" in rep["baselines"]:
                    per_arm[own[arm]][(seed, silo)] = rep["baselines"]["zerogen"]["silos"][silo]["acc"]
            n_rounds = len(next(iter(rep["silos"].values()))["acc_after"])
            curves[arm].append([float(np.mean([s["acc_local"] for s in rep["silos"].values()]))] +
                               [float(np.mean([s["acc_after"][r] for s in rep["silos"].values()])) for r in range(n_rounds)])
            llm[arm].append({**{k: rep["llm"][k] for k in ("acc_before", "acc_after", "on_label_before",
                                                             "on_label_after", "ppl_before", "ppl_after")},
                             **{k: rep["llm"][k] for k in ("balanced_acc_before", "balanced_acc_after")
                                if k in rep["llm"]},  # runs from before 2026-12-02 lack it
                             **{f"kl_round_{i + 1}": rnd["kl"] for i, rnd in enumerate(rep["rounds"])},
                             **{f"pred_rate_before_{lab}": v for lab, v in _rates(rep["llm"]["pred_rate_before"])},
                             **{f"pred_rate_after_{lab}": v for lab, v in _rates(rep["llm"]["pred_rate_after"])}})
    summary: dict = {"seeds": seeds, "arms": {}, "comparisons": {}, "per_silo": {}, "curves": {}, "llm": {},
                     "gate": gate_summary(reports, arms),
                     "label_quality": label_quality_summary(reports, arms),
                     "ablations": ablation_summary(reports, seeds, arms)}
    for arm, accs in per_arm.items():
        by_seed = {}
        for (seed, _), acc in accs.items():
            by_seed.setdefault(seed, []).append(acc)
        summary["arms"][arm] = mean_std([np.mean(v) for v in by_seed.values()])
    for arm in arms:
        for other in (*BASELINES, *([own[arm]] if arm in own else []), *([unsynced[arm]] if arm in unsynced else []),
                      *[a for a in (*arms, *own.values()) if a != arm and arm == "crosslm"]):
            keys = sorted(set(per_arm[arm]) & set(per_arm[other]))
            if keys:
                cmp = paired_bootstrap([per_arm[arm][k] for k in keys], [per_arm[other][k] for k in keys])
                summary["comparisons"][f"{arm}_vs_{other}"] = {k: (v * 100 if k != "n_pairs" else v) for k, v in cmp.items()}
    for silo, arch in archs.items():
        summary["per_silo"][silo] = {"arch": arch, **{
            arm: mean_std([acc for (seed, s), acc in per_arm[arm].items() if s == silo]) for arm in per_arm}}
    for arm in arms:
        if curves[arm]:
            c = np.asarray(curves[arm])
            summary["curves"][arm] = {"mean": c.mean(0).tolist(), "std": c.std(0).tolist()}
        if llm[arm]:
            keys = dict.fromkeys(k for x in llm[arm] for k in x)
            summary["llm"][arm] = {k: mean_std([x[k] for x in llm[arm] if k in x]) for k in keys}
    return summary


def _of_arms(reports: Reports, arms: list[str]):
    """(arm, report) of the finished runs of these arms, seed by seed."""
    return [(arm, rep) for (arm, _), rep in reports.items() if arm in arms]


def ablation_summary(reports: Reports, seeds: list[int], arms: list[str]) -> dict:
    """Each arm against crosslm (the protocol) on the seeds both finished: the SLMs' mean and the
    LLM's figures after the rounds, side by side, so a part is judged on the same seeds."""
    found: dict = {}
    for arm in arms:
        if arm == "crosslm":
            continue
        pairs = [(s, reports.get((arm, s)), reports.get(("crosslm", s))) for s in seeds]
        pairs = [(s, a, c) for s, a, c in pairs if a is not None and c is not None]
        if not pairs:
            continue
        row: dict = {"seeds": [s for s, _, _ in pairs]}
        for name, reps in (("arm", [a for _, a, _ in pairs]), ("protocol", [c for _, _, c in pairs])):
            llm = [r["llm"] for r in reps]
            row[name] = {
                "slm": float(np.mean([np.mean([final_acc(x) for x in r["silos"].values()]) for r in reps])),
                "llm_acc_after": float(np.mean([m["acc_after"] for m in llm])),
                "on_label_after": float(np.mean([m["on_label_after"] for m in llm])),
                "ppl_change": float(np.mean([m["ppl_after"] / m["ppl_before"] - 1 for m in llm])),
                **({"balanced_acc_after": float(np.mean([m["balanced_acc_after"] for m in llm]))}
                   if all("balanced_acc_after" in m for m in llm) else {}),
            }
        found[arm] = row
    return found


def gate_summary(reports: Reports, arms: list[str]) -> dict:
    """What each silo's keep-if-better gate earned, on test data the silo never sees: per arm,
    the decisions, how many refused the continued model, and the mean test accuracy of the
    model kept minus the one continued (points; > 0: the gate helped). Runs made before the
    reports carried ``acc_returned`` are left out."""
    pairs: dict[str, list[tuple[float, float, bool]]] = {}
    for arm, rep in _of_arms(reports, arms):
        for rnd in rep["rounds"]:
            for s in rnd["silos"].values():
                if "acc_returned" in s:
                    pairs.setdefault(arm, []).append((s["acc"], s["acc_returned"], s["adopted"]))
        if zerogen_of(arm):
            for s in rep.get("baselines", {}).get("zerogen", {}).get("silos", {}).values():
                if "acc_returned" in s:
                    pairs.setdefault(zerogen_of(arm), []).append((s["acc"], s["acc_returned"], s["adopted"]))
    gate = {}
    for arm, ps in pairs.items():
        kept, returned, adopted = (np.asarray(x, dtype=float) for x in zip(*ps))
        refused = adopted == 0
        gate[arm] = {"decisions": len(ps), "refused": int(refused.sum()),
                     "earned_points": float(100 * (kept - returned).mean()),
                     "earned_points_when_refused": float(100 * (kept - returned)[refused].mean()) if refused.any() else 0.0}
    return gate


QUALITY = ("judge_on_label", "judge_on_label_kept", "reward_auc", "llm_weight", "truncated_rate")


def label_quality_summary(reports: Reports, arms: list[str]) -> dict:
    """Per arm and round (ZeroGen: its one generation), the judge's view of the synthetic data:
    on-label rate of all generated and of the kept texts, and the reward's AUC for on-label
    texts; the LLM's filter weight and the share of generations that hit the token cap; means ±
    std over seeds. Runs made before reports carried these are left out."""
    rows: dict[str, dict[str, list[float]]] = {}
    for arm, rep in _of_arms(reports, arms):
        for rnd in rep["rounds"]:
            for k in QUALITY:
                per_silo = [s[k] for s in rnd["silos"].values() if k in s]
                value = rnd[k] if k in rnd else float(np.mean(per_silo)) if per_silo else None  # older round totals
                if value is not None:
                    rows.setdefault(f"{arm} r{rnd['round']}", {}).setdefault(k, []).append(value)
        z = rep.get("baselines", {}).get("zerogen", {})
        for k in QUALITY:
            if zerogen_of(arm) and k in z:
                rows.setdefault(zerogen_of(arm), {}).setdefault(k, []).append(z[k])
    return {name: {k: mean_std(v) for k, v in cols.items()} for name, cols in rows.items()}


def _rates(rates) -> list[tuple[str, float]]:
    """Predicted-label rates as (label, rate) pairs, whether stored as a dict or a list."""
    return list(rates.items()) if isinstance(rates, dict) else [(str(i), r) for i, r in enumerate(rates)]


def headline(summary: dict) -> dict:
    """The figures docs/results.json keeps per task: CrossLM's SLM gains (points, paired 95 %
    intervals) and the LLM before and after (fractions; perplexity as is), means over seeds."""
    done = summary["arms"].get("crosslm", {}).get("n", 0)
    out: dict = {"seeds": done}
    # against the strongest ZeroGen the study ran on as many seeds (e.g. its own label mode's): its
    # choice is made on the test figures, which can only favour the baseline
    names = {zerogen_of(a) for a in ("crosslm", *OWN_ZEROGEN)}
    zerogens = {a: s for a, s in summary["arms"].items() if a in names and s["n"] == done and done}
    best = max(zerogens, key=lambda a: zerogens[a]["mean"], default="zerogen")
    for name, other in (("slm_gain_vs_silo_only", "silo_only"), ("slm_gain_vs_zerogen", best)):
        c = summary["comparisons"].get(f"crosslm_vs_{other}")
        if c:
            out[name] = {k: c[k] for k in ("mean", "ci_low", "ci_high")}
    if best != "zerogen" and "slm_gain_vs_zerogen" in out:
        out["slm_gain_vs_zerogen"]["zerogen"] = best
    llm = summary["llm"].get("crosslm", {})
    for key, name in (("acc_before", "llm_acc_before"), ("acc_after", "llm_acc_after"),
                      ("on_label_before", "on_label_before"), ("on_label_after", "on_label_after"),
                      ("ppl_before", "ppl_before"), ("ppl_after", "ppl_after")):
        if key in llm:
            out[name] = llm[key]["mean"]
    return out


def merge_results(study_dirs: list[Path], out: Path) -> dict:
    """``docs/results.json``: each study's headline under its task (later studies of a task win)."""
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("tasks", {})
    for d in study_dirs:
        summary = json.loads((d / "study.json").read_text())
        results["tasks"][summary["task"]] = {**summary["headline"], "study": str(d)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def render(summary: dict) -> str:
    lines = [f"# CrossLM study (seeds {summary['seeds']})", "", "## SLM accuracy, mean over silos (%)", "",
             "| arm | mean | std | seeds |", "|---|---|---|---|"]
    for arm, s in summary["arms"].items():
        if s["n"]:
            lines.append(f"| {arm} | {100 * s['mean']:.1f} | {100 * s['std']:.1f} | {s['n']} |")
    lines += ["", "## Paired differences (points, 95 % bootstrap interval over silo×seed pairs)", "",
              "| comparison | mean | 95 % interval | pairs |", "|---|---|---|---|"]
    for name, c in summary["comparisons"].items():
        lines.append(f"| {name} | {c['mean']:+.1f} | [{c['ci_low']:+.1f}, {c['ci_high']:+.1f}] | {c['n_pairs']} |")
    lines += ["", "## LLM", "", "| arm | zero-shot before | after | on-label before | after | ppl before | after |",
              "|---|---|---|---|---|---|---|"]
    for arm, m in summary["llm"].items():
        lines.append(f"| {arm} | {100 * m['acc_before']['mean']:.1f} | {100 * m['acc_after']['mean']:.1f} ± "
                     f"{100 * m['acc_after']['std']:.1f} | {100 * m['on_label_before']['mean']:.1f} | "
                     f"{100 * m['on_label_after']['mean']:.1f} | {m['ppl_before']['mean']:.2f} | {m['ppl_after']['mean']:.2f} |")
    lines += ["", "Predicted-label rates of the LLM's zero-shot answers and KL to the base per round (means over seeds):", ""]
    for arm, m in summary["llm"].items():
        rates = lambda when: ", ".join(f"{k.split('_', 3)[-1]} {100 * v['mean']:.0f} %"  # noqa: E731
                                       for k, v in m.items() if k.startswith(f"pred_rate_{when}_"))
        kls = ", ".join(f"{v['mean']:.4f}" for k, v in m.items() if k.startswith("kl_round_"))
        balanced = (f"; balanced accuracy {100 * m['balanced_acc_before']['mean']:.1f} → "
                    f"{100 * m['balanced_acc_after']['mean']:.1f} % ({m['balanced_acc_after']['n']} seeds)"
                    if "balanced_acc_after" in m and "balanced_acc_before" in m else "")
        lines.append(f"- {arm}: before {rates('before')}; after {rates('after')}{balanced}; KL per round {kls}")
    if summary.get("ablations"):
        lines += ["", "## Each arm against the protocol (crosslm) on the seeds both finished", "",
                  "SLMs: test accuracy, mean over silos and those seeds (%); protocol vs arm: the paired "
                  "difference in points (> 0: what the part the arm removes earns). LLM after the rounds, "
                  "arm / protocol:", "",
                  "| arm | seeds | SLMs, arm | SLMs, protocol | protocol vs arm | LLM raw zero-shot | "
                  "LLM balanced | judge on-label | ppl change |", "|---|---|---|---|---|---|---|---|---|"]
        for arm, row in summary["ablations"].items():
            a, p = row["arm"], row["protocol"]
            c = summary["comparisons"].get(f"crosslm_vs_{arm}")
            diff = f"{c['mean']:+.1f} [{c['ci_low']:+.1f}, {c['ci_high']:+.1f}] ({c['n_pairs']} pairs)" if c else "–"
            pct = lambda k: (f"{100 * a[k]:.1f} / {100 * p[k]:.1f} %" if k in a and k in p else "–")  # noqa: E731
            lines.append(f"| {arm} | {', '.join(map(str, row['seeds']))} | {100 * a['slm']:.1f} | {100 * p['slm']:.1f} | "
                         f"{diff} | {pct('llm_acc_after')} | {pct('balanced_acc_after')} | {pct('on_label_after')} | "
                         f"{100 * a['ppl_change']:+.1f} / {100 * p['ppl_change']:+.1f} % |")
    if summary.get("label_quality"):
        lines += ["", "## Label quality of the synthetic data, by the judge", "",
                  "The judge's agreement with the intended label over all generated texts and over the "
                  "kept ones (%), and the reward's AUC for the texts the judge agrees with (0.5: the reward "
                  "carries no label information), the LLM's weight in the filter (`filter.llm_weight`; "
                  "\"auto\" sets it per batch) and the generations that hit the token cap before they ended "
                  "(truncated, %; runs from before 2026-12-07: –); means over seeds:", "",
                  "| arm, round | on-label, all | on-label, kept | reward AUC | LLM weight | truncated |",
                  "|---|---|---|---|---|---|"]
        for name, q in summary["label_quality"].items():
            cells = [f"{scale * q[k]['mean']:.{digits}f}" if k in q else "–"
                     for k, scale, digits in (("judge_on_label", 100, 1), ("judge_on_label_kept", 100, 1),
                                              ("reward_auc", 1, 2), ("llm_weight", 1, 2), ("truncated_rate", 100, 1))]
            lines.append(f"| {name} | {' | '.join(cells)} |")
    if summary.get("gate"):
        lines += ["", "## The silos' keep-if-better gate", "",
                  "Test accuracy of the model each silo kept minus the continued model it was offered "
                  "(points; > 0: the gate helped), over every decision (silo × round × seed):", "",
                  "| arm | decisions | refused | earned, all decisions | earned, when refused |", "|---|---|---|---|---|"]
        for arm, g in summary["gate"].items():
            lines.append(f"| {arm} | {g['decisions']} | {g['refused']} | {g['earned_points']:+.2f} | "
                         f"{g['earned_points_when_refused']:+.1f} |")
    return "\n".join(lines) + "\n"
