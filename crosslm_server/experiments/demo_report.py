"""The `crosslm demo` report, built from what the silos' daemons wrote (report schema of report.py).

Every figure comes from a real measurement, nothing is recomputed here:

- a silo's ``acc_local`` is its daemon's first SLM (trained on private data alone, with the
  learning-rate grid) on the silo's public test set, and ``acc_after[r]`` the model it kept after
  round r on the same set (``test_accuracy_before`` / ``test_accuracy_after`` in its round reports);
- each round's generated, kept, reward, KL, … are the server's round metrics for that silo's
  submission (``server_metrics``, as the worker stored them);
- the LLM's zero-shot accuracy and perplexity were measured by the server's engine on its
  ``eval_data``: at load (``llm_base_*``) and after every ``eval_every``-th adapter version
  (``llm_*``). "After round r" is the first measurement taken once every round-r update was applied.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from crosslm_shared.errors import DemoReportError
from crosslm_shared.records import Stage

STAGES = ("generate", "score", "filter", "update_llm", "enhance_slm")



def _llm_figures(metrics: dict[str, Any], prefix: str, labels: list[str]) -> dict[str, Any]:
    rates = {label: metrics[f"{prefix}_rate_{label}"] for label in labels if f"{prefix}_rate_{label}" in metrics}
    return {"acc": metrics[f"{prefix}_acc"], "ppl": metrics[f"{prefix}_ppl"], "pred_rate": rates,
            "texts": metrics.get(f"{prefix}_eval_texts"), "docs": metrics.get(f"{prefix}_eval_docs")}


def load_silo_reports(silo_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((silo_dir / "reports").glob("round-*.json"))]


def build_report(silo_dirs: dict[str, Path], *, rounds: int, header: dict[str, Any]) -> dict[str, Any]:
    """report.json's content from each silo's ``reports/round-NNN.json`` (see the module docstring)."""
    report: dict[str, Any] = {"kind": "demo", **header, "silos": {}, "rounds": [], "llm": {}, "failed_rounds": []}
    labels = list(header.get("labels", ()))
    per_round: list[dict[str, dict]] = [{} for _ in range(rounds)]
    evaluations: dict[int, dict] = {}
    base = None
    for name, folder in silo_dirs.items():
        reps = load_silo_reports(folder)
        if not reps or len(reps) < rounds:
            raise DemoReportError(f"{name} wrote {len(reps)} of {max(rounds, 1)} round reports in "
                                  f"{folder / 'reports'}: did its daemon run a round?")
        if "test_accuracy_before" not in reps[0]:
            raise DemoReportError(f"{name}'s reports carry no test accuracy: its config lacks [silo] test_data")
        first = reps[0]
        report["silos"][name] = {
            "arch": first["arch"], "n_private": first["n_train"] + first["n_heldout"], "n_train": first["n_train"],
            "n_heldout": first["n_heldout"], "n_test": first["test_examples"], "label_counts": first["label_counts"],
            "acc_local": first["test_accuracy_before"], "acc_after": [r["test_accuracy_after"] for r in reps],
            "adopted": [r["kept"] == "enhanced" for r in reps], "heldout_local": first["accuracy_before"],
            "heldout_after": [r["accuracy_after"] for r in reps], "train": first.get("train", {}),
            # docs/privacy.md: ε spent by the end (a DP silo) and the audit of each model it sent
            "privacy": reps[-1].get("privacy_after") or reps[-1].get("privacy") or {"dp": False},
            "audit": [r["audit"] for r in reps if "audit" in r]}
        for rep in reps[:rounds]:
            m = rep.get("server_metrics", {})  # typed as the engine reported them (ints, floats, lists)
            if rep["outcome"] != Stage.READY:
                report["failed_rounds"].append({"silo": name, "round": rep["round"], "error": rep.get("error", "")})
                continue
            per_round[rep["round"] - 1][name] = {
                **{k: m[k] for k in ("generated", "kept", "kept_per_label", "reward_mean", "reward_std", "reward_hist",
                                     "agree_rate", "kl", "distinct_2", "distinct_2_kept", "truncated", "truncated_rate", "tokens_per_s",
                                     "adapter_version") if k in m},
                "seconds_per_stage": {s: m.get(f"seconds_{s}", 0.0) for s in STAGES},
                "acc": rep["test_accuracy_after"], "adopted": rep["kept"] == "enhanced",
                "synthetic_returned": rep.get("synthetic_examples", 0), "selection": rep.get("selection", {}),
                "seconds_silo": rep.get("seconds"), "upload_seconds": rep.get("upload_seconds"),
                "download_seconds": rep.get("download_seconds")}
            if "llm_acc" in m:
                evaluations[m["adapter_version"]] = {"after_update": m["adapter_version"], "silo": name,
                                                     "round": rep["round"], **_llm_figures(m, "llm", labels)}
            if base is None and "llm_base_acc" in m:
                base = _llm_figures(m, "llm_base", labels)
    if report["failed_rounds"]:
        raise DemoReportError("rounds failed on the server: " + "; ".join(
            f"{f['silo']} round {f['round']}: {f['error']}" for f in report["failed_rounds"]))
    if base is None or not evaluations:
        raise DemoReportError("the server measured no LLM figures: its engine options lack eval_data")
    measured = [evaluations[v] for v in sorted(evaluations)]
    for r, silos in enumerate(per_round, start=1):
        last_update = max(s["adapter_version"] for s in silos.values())
        llm = next((e for e in measured if e["after_update"] >= last_update), measured[-1])
        report["rounds"].append({"round": r, "silos": silos, **_totals(silos), "llm": llm})
    last = report["rounds"][-1]["llm"]
    report["llm"] = {"acc_before": base["acc"], "pred_rate_before": base["pred_rate"], "ppl_before": base["ppl"],
                     "acc_after": last["acc"], "pred_rate_after": last["pred_rate"], "ppl_after": last["ppl"],
                     "eval_texts": base["texts"], "eval_docs": base["docs"], "evaluations": measured}
    return report


def _totals(silos: dict[str, dict]) -> dict[str, Any]:
    """A round over all silos: counts add up, rates are the mean over silos, stage seconds add up."""
    vals = list(silos.values())
    return {"generated": sum(v["generated"] for v in vals), "kept": sum(v["kept"] for v in vals),
            "truncated": sum(v["truncated"] for v in vals),
            # of every text generated in the round (servers from before 2026-12-07 report no rate)
            **({"truncated_rate": sum(v["truncated"] for v in vals) / max(1, sum(v["generated"] for v in vals))}
               if all("truncated_rate" in v for v in vals) else {}),
            **{k: float(np.mean([v[k] for v in vals])) for k in ("reward_mean", "kl", "distinct_2")},
            "seconds_per_stage": {s: sum(v["seconds_per_stage"][s] for v in vals) for s in STAGES}}


def gains(report: dict[str, Any]) -> dict[str, float]:
    """The headline: mean SLM gain over silos and the LLM's change, in points (accuracy) and % (perplexity)."""
    silos = report["silos"].values()
    llm = report["llm"]
    return {"slm_mean_local": float(np.mean([s["acc_local"] for s in silos])),
            "slm_mean_after": float(np.mean([s["acc_after"][-1] for s in silos])),
            "slm_gain_points": float(100 * np.mean([s["acc_after"][-1] - s["acc_local"] for s in silos])),
            "llm_gain_points": 100 * (llm["acc_after"] - llm["acc_before"]),
            "ppl_change_percent": 100 * (llm["ppl_after"] / llm["ppl_before"] - 1)}


def write_demo_report(out: Path, silo_dirs: dict[str, Path], *, rounds: int, header: dict[str, Any],
                      seconds: float | None = None) -> dict[str, Any]:
    """report.json, report.md (with how each figure was measured) and the plots into ``out``."""
    from crosslm_server.experiments.report import check_schema, write_report

    report = build_report(silo_dirs, rounds=rounds, header=header)
    if seconds is not None:
        report["timing"] = {"total_s": seconds}
    report["gains"] = gains(report)
    out.mkdir(parents=True, exist_ok=True)
    write_report(report, out)
    with open(out / "report.md", "a") as f:
        f.write(_notes(report, silo_dirs))
    missing = check_schema(report)
    if missing:
        raise DemoReportError(f"report.json lacks {missing}")
    return report


def summary(report: dict[str, Any]) -> str:
    g, llm = report["gains"], report["llm"]
    return (f"SLMs (mean over silos, public test sets): {100 * g['slm_mean_local']:.1f} % silo-only -> "
            f"{100 * g['slm_mean_after']:.1f} % after {len(report['rounds'])} rounds ({g['slm_gain_points']:+.1f} "
            f"points); LLM zero-shot {100 * llm['acc_before']:.1f} % -> {100 * llm['acc_after']:.1f} % "
            f"({g['llm_gain_points']:+.1f} points), perplexity {llm['ppl_before']:.2f} -> {llm['ppl_after']:.2f} "
            f"({g['ppl_change_percent']:+.1f} %)")


def _notes(report: dict[str, Any], silo_dirs: dict[str, Path]) -> str:
    llm = report["llm"]
    train = next(iter(report["silos"].values()))["train"]
    tests = sorted({s["n_test"] for s in report["silos"].values()})
    return f"""
## How this was measured

- Each silo is a `crosslm-client run` daemon holding its private data. It trained its first SLM on that data
  alone (learning rates {train.get('lrs', '?')}, the best epoch of {train.get('max_epochs', train.get('epochs', '?'))} on its own held-out
  split): that model's accuracy on the silo's public test set ({' / '.join(map(str, tests))} examples per silo, drawn
  from the task's overall distribution, never trained on or used to choose a model) is **silo-only**. After each
  round the silo continued the returned SLM on its private data plus the synthetic set that came back with it
  ({train.get('continue_epochs', '?')} epochs, same learning rates, best by balanced accuracy on its held-out split)
  and kept whichever of that and its current model was better there (ties to the newer); **CrossLM rN** is the
  kept model on the same test set.
- The LLM was measured by the server itself (engine `crosslm`) on {llm['eval_texts']} zero-shot test texts that no
  silo holds, and its perplexity on {llm['eval_docs']} general-corpus documents: at load, and after adapter versions
  {', '.join(str(e['after_update']) for e in llm['evaluations'])} (one update per submission). "After round r" is the
  first measurement once every round-r update was in: {', '.join(f"round {r['round']} = after update "
  f"{r['llm']['after_update']}" for r in report['rounds'])}.
- Per-round reports of each silo: {', '.join(f'`{d}/reports/`' for d in silo_dirs.values())}.
"""
