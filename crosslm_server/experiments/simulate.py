"""`crosslm simulate`: N silos and R rounds in one process, with the honest baselines.

Arms, all on the same split and with the same SLM selection on each silo's validation data:
- silo-only: the SLM trained on the silo's private data alone (``acc_local``);
- ZeroGen: the silo-only SLM fine-tuned on synthetic data from the untouched LLM (same
  filter, same per-silo budget of generated texts as CrossLM over all rounds), then
  continued on private data and kept if better;
- CrossLM: each round, the silos' SLMs arrive one by one; each runs a round (the adapter
  carries over), and the silo continues the returned SLM on private data, keeping it if better.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from crosslm_server.experiments.cache import ArtefactCache, config_key
from crosslm_server.method.config import SimConfig, as_dict
from crosslm_server.method.enhance import enhance_slm, targets
from crosslm_server.method.evaluate import general_corpus, label_quality, on_label_rate, perplexity, zero_shot
from crosslm_server.method.filter import select
from crosslm_server.method.generate import generate
from crosslm_server.method.llm import load_llm
from crosslm_server.method.pool import SyntheticPool
from crosslm_server.experiments.report import write_report
from crosslm_server.method.reward import judged_proba, score
from crosslm_server.method.round import run_round
from crosslm_shared.data import Split, load_examples, split_task
from crosslm_shared.slm import SLM, adopt_if_better, train_selected
from crosslm_shared.tasks import TaskSpec, load_task

log = logging.getLogger(__name__)


def _pair(ex):
    return list(ex.texts), list(ex.labels)


def train_judge(task: TaskSpec, split: Split, cfg: SimConfig) -> SLM:
    """The independent judge: an SLM trained on the judge pool, which no silo holds."""
    n = len(split.judge_train)
    cut = int(n * 0.8)
    train = split.judge_train.subset(range(cut))
    val = split.judge_train.subset(range(cut, n))
    judge_cfg = replace(cfg.round.slm, lrs=(cfg.eval.judge_lr,), max_epochs=cfg.eval.judge_epochs, seed=cfg.seed)
    judge, _ = train_selected(cfg.eval.judge_arch, task.label_names, _pair(train), _pair(val), judge_cfg, desc="judge")
    return judge


def _zero_shot(llm, task, split, cfg: SimConfig) -> dict:
    return zero_shot(llm, task, list(split.llm_test.texts), list(split.llm_test.labels), batch_size=cfg.eval.batch_size)


def llm_snapshot(llm, task, split, docs, cfg: SimConfig) -> dict:
    zs = _zero_shot(llm, task, split, cfg)
    return {"acc": zs["acc"], "pred_rate": zs["pred_rate"], "balanced_acc": zs["balanced_acc"],
            "ppl": perplexity(llm, docs, max_tokens=cfg.eval.ppl_max_tokens)}


def judged_generations(llm, task, judge, cfg: SimConfig, seed: int) -> float:
    gen = generate(llm, task, cfg.round.generate, seed=seed, per_label=cfg.eval.judge_per_label)
    return on_label_rate(judge, gen.samples)


def zerogen_budget(cfg: SimConfig) -> int:
    """Texts per label ZeroGen generates: as many as CrossLM generates for the synthetic set a
    silo draws from (one silo's rounds, or every silo's rounds with the pool)."""
    return cfg.round.generate.per_label * cfg.rounds * (cfg.split.n_silos if cfg.synthetic_pool else 1)


def zerogen_baseline(llm, task, split, local: dict[str, SLM], cfg: SimConfig, judge: SLM | None) -> dict:
    """ZeroGen-style: the untouched LLM's samples, the same filter and budget, the same silo-side step."""
    budget = zerogen_budget(cfg)
    gen = generate(llm, task, cfg.round.generate, seed=cfg.seed + 7919, per_label=budget)
    texts = [s.text for s in gen.samples]
    labels = [s.label for s in gen.samples]
    scores = score(list(local.values()), texts, labels)
    judged, llm_weight = judged_proba(scores, llm, task, texts, labels, cfg.round.filter.llm_weight)
    keep = select(texts, labels, judged, cfg.round.filter)
    target = targets([labels[i] for i in keep], judged[keep], cfg.round.enhance)
    out = {**gen.stats(), "generated": gen.generated, "scored": len(texts), "kept": len(keep), "llm_weight": llm_weight,
           "silos": {}, **label_quality(judge, texts, labels, keep, scores.reward)}
    kept_texts = [texts[i] for i in keep]
    for silo in split.silos:
        _, out["silos"][silo.name] = take_synthetic(silo, local[silo.name], kept_texts, target, cfg, cfg.round.slm,
                                                    desc=f"{silo.name} zerogen")
    return out


def take_synthetic(silo, current: SLM, texts: list[str], target: np.ndarray, cfg: SimConfig, slm_cfg,
                   *, desc: str, privacy=None) -> tuple[SLM, dict]:
    """A silo takes a whole synthetic set at once (ZeroGen's set; CrossLM's pool at the final
    sync): its SLM fine-tuned on the set, continued on private data (plus the set), and kept only
    if better on the silo's validation split. Returns the chosen SLM and its test figures."""
    enhanced, _ = enhance_slm(current, texts, target, cfg.round.enhance, slm_cfg)
    seen: dict = {}
    chosen, info = adopt_if_better(current, enhanced, _pair(silo.train), _pair(silo.val), slm_cfg,
                                   synthetic=(texts, target) if cfg.continue_on == "private+synthetic" else None,
                                   desc=desc, inspect=_test_acc(silo, seen), privacy=privacy)
    acc = seen["acc"] if info["adopted"] else chosen.evaluate(*_pair(silo.test))
    return chosen, {"acc": acc, "adopted": info["adopted"], "acc_returned": seen["acc"], "n_synthetic": len(texts),
                    **{k: info[k] for k in ("val_acc_current", "val_acc_returned", "n_val")}}


def simulate(cfg: SimConfig, out: Path, *, cache_dir: Path | None = None, baselines_only: bool = False) -> dict:
    """Run the arms and write ``out/report.json`` and ``out/report.md``.

    With ``cache_dir``, the silo-only SLMs, the judge, the untouched LLM's figures and the
    ZeroGen baseline are reused from earlier runs with the same config parts (a study's arms).
    ``baselines_only`` stops before the CrossLM rounds and returns the report's baselines part,
    writing nothing to ``out``.
    """
    if not baselines_only:
        out.mkdir(parents=True, exist_ok=True)
    cache = ArtefactCache(cache_dir)

    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    task = load_task(cfg.task)
    examples = load_examples(task)
    split = split_task(examples, task.num_labels, cfg.split, seed=cfg.seed)
    c = as_dict(cfg)
    base_key, llm_key, zerogen_key = cache_keys(cfg, split)
    slm_cfg = replace(cfg.round.slm, seed=cfg.seed)
    rcfg = replace(cfg.round, slm=slm_cfg)
    report: dict = {"task": task.name, "seed": cfg.seed, "config": c, "silos": {}, "rounds": [],
                    "baselines": {}, "timing": {}}

    t = time.perf_counter()
    local: dict[str, SLM] = {}
    budgets = silo_budgets(cfg, split)
    for i, silo in enumerate(tqdm(split.silos, desc="silo-only SLMs", disable=None)):
        arch = cfg.archs[i % len(cfg.archs)]

        def train(arch=arch, silo=silo):
            return train_selected(arch, task.label_names, _pair(silo.train), _pair(silo.val), slm_cfg,
                                  desc=f"{silo.name} local", privacy=budgets.get(silo.name))
        # a cached DP model would not charge this run's budget: train it here
        slm, info = train() if budgets else cache.slm(f"local-{silo.name}", base_key, train)
        local[silo.name] = slm
        report["silos"][silo.name] = {
            "arch": arch, "n_private": len(silo.train) + len(silo.val), "n_train": len(silo.train),
            "label_counts": (silo.train + silo.val).label_counts(task.num_labels),
            "acc_local": slm.evaluate(*_pair(silo.test)), "local_selection": info, "acc_after": [], "adopted": []}
        log.info("%s (%s): silo-only test acc %.3f", silo.name, arch, report["silos"][silo.name]["acc_local"])
    report["timing"]["silo_only_s"] = time.perf_counter() - t

    t = time.perf_counter()
    torch.manual_seed(cfg.seed)  # the LoRA's random init, whether or not the silo-only SLMs were trained here
    llm = load_llm(cfg.llm)
    docs = general_corpus(cfg.eval.n_ppl_docs)
    if split.judge_train:
        judge, _ = cache.slm("judge", llm_key, lambda: (train_judge(task, split, cfg), {}))
    else:
        judge = None
        log.warning("no judge pool (split.n_judge = 0): the judge's on-label figures are NaN")
    before = cache.json("llm-before", llm_key, lambda: {
        **llm_snapshot(llm, task, split, docs, cfg),
        "on_label": judged_generations(llm, task, judge, cfg, seed=cfg.seed + 1)})
    if "balanced_acc" not in before:  # cached before the figure existed: measure it once
        before["balanced_acc"] = _zero_shot(llm, task, split, cfg)["balanced_acc"]
        cache.put_json("llm-before", llm_key, before)
    report["llm"] = {"acc_before": before["acc"], "pred_rate_before": before["pred_rate"],
                     "balanced_acc_before": before["balanced_acc"],
                     "ppl_before": before["ppl"], "on_label_before": before["on_label"]}
    report["timing"]["llm_eval_before_s"] = time.perf_counter() - t

    if cfg.zerogen:
        t = time.perf_counter()
        report["baselines"]["zerogen"] = cache.json("zerogen", zerogen_key,
                                                    lambda: zerogen_baseline(llm, task, split, local, cfg, judge))
        report["timing"]["zerogen_s"] = time.perf_counter() - t
    if baselines_only:
        return report

    # the rounds start from the same random state whether the baselines came from the cache or were
    # computed here (their training draws from torch's generator): SMS seed 0 run twice, once on a
    # cold cache and once warm, differed by 1.3 points in the SLMs and 19 in the LLM's balanced accuracy
    torch.manual_seed(cfg.seed * 7919 + 1)
    latest = dict(local)
    pool = SyntheticPool()
    t = time.perf_counter()
    for r in range(1, cfg.rounds + 1):
        round_rec = {"round": r, "silos": {}}
        for j, silo in enumerate(split.silos):
            log.info("round %d: %s submits its SLM", r, silo.name)
            res = run_round(llm, task, latest[silo.name], list(latest.values()), rcfg,
                            seed=cfg.seed * 1000 + r * 100 + j)
            synthetic = res.synthetic
            if cfg.synthetic_pool:
                pool.add(task.name, f"r{r}-{silo.name}", *res.synthetic)
                synthetic = pool.get(task.name, task.num_labels)
            seen = {}
            chosen, info = adopt_if_better(latest[silo.name], res.enhanced, _pair(silo.train), _pair(silo.val),
                                           slm_cfg, synthetic=synthetic if cfg.continue_on == "private+synthetic"
                                           else None, desc=f"{silo.name} r{r}", inspect=_test_acc(silo, seen),
                                           privacy=budgets.get(silo.name))
            latest[silo.name] = chosen
            acc = seen["acc"] if info["adopted"] else chosen.evaluate(*_pair(silo.test))
            report["silos"][silo.name]["acc_after"].append(acc)
            report["silos"][silo.name]["adopted"].append(info["adopted"])
            quality = label_quality(judge, [x.text for x in res.samples], [x.label for x in res.samples], res.keep,
                                    res.scores.reward)
            round_rec["silos"][silo.name] = {**res.metrics, **quality, "acc": acc, "acc_returned": seen["acc"],
                                             "adopted": info["adopted"],
                                             "val_acc_returned": info["val_acc_returned"],
                                             "val_acc_current": info["val_acc_current"], "n_val": info["n_val"],
                                             "n_synthetic": len(synthetic[0])}
            if budgets:
                round_rec["silos"][silo.name]["epsilon"] = budgets[silo.name].spent()
            _dump_samples(out / f"samples-r{r}-{silo.name}.jsonl", res)
            log.info("round %d %s: kept %d/%d, reward %.3f, kl %.4f, test acc %.3f (adopted=%s)", r, silo.name,
                     res.metrics["kept"], res.metrics["generated"], res.metrics["reward_mean"], res.metrics["kl"],
                     acc, info["adopted"])
        snap = llm_snapshot(llm, task, split, docs, cfg)
        round_rec["llm"] = snap
        round_rec |= _round_totals(round_rec["silos"])
        report["rounds"].append(round_rec)
        if cfg.save_adapters:
            path = llm.save_adapter(out / "adapters" / f"round-{r}")
            (path / "crosslm_round.json").write_text(json.dumps({"round": r, "llm": snap}, indent=2))
        (out / "report.partial.json").write_text(json.dumps(report, indent=2, default=float))
    if cfg.final_sync:
        texts, target = pool.get(task.name, task.num_labels)
        for silo in split.silos:
            latest[silo.name], sync = take_synthetic(silo, latest[silo.name], texts, target, cfg, slm_cfg,
                                                     desc=f"{silo.name} sync", privacy=budgets.get(silo.name))
            report["silos"][silo.name] |= {"acc_final": sync["acc"], "sync": sync}
            log.info("final sync %s: %d pooled examples, test acc %.3f (adopted=%s)", silo.name, len(texts),
                     sync["acc"], sync["adopted"])
    report["timing"]["crosslm_s"] = time.perf_counter() - t
    for name, budget in budgets.items():
        report["silos"][name]["privacy"] = budget.summary()

    last = report["rounds"][-1]["llm"]
    report["llm"] |= {"acc_after": last["acc"], "pred_rate_after": last["pred_rate"], "ppl_after": last["ppl"],
                      "balanced_acc_after": last["balanced_acc"],
                      "on_label_after": judged_generations(llm, task, judge, cfg, seed=cfg.seed + 2)}
    report["timing"]["total_s"] = time.perf_counter() - started
    write_report(report, out)
    (out / "report.partial.json").unlink(missing_ok=True)
    return report


def _test_acc(silo, seen: dict):
    """An ``adopt_if_better`` inspector: the continued model's test accuracy, kept or not, so the
    report can say what the silo's keep-if-better gate earned (the silo itself never sees it)."""
    def inspect(model: SLM) -> None:
        seen["acc"] = model.evaluate(*_pair(silo.test))
    return inspect


def cache_keys(cfg: SimConfig, split: Split) -> tuple[str, str, str]:
    """The artefact cache's keys: silo-only SLMs, then the judge and the untouched LLM's figures,
    then ZeroGen; keyed by the split's contents too, so a change in how data is cut never
    reuses stale models."""
    c = as_dict(cfg)
    dp = [c["privacy"]] if cfg.privacy.enabled else []  # keys of runs without DP stay as they were
    base_key = config_key(c["task"], c["seed"], c["split"], c["archs"], c["round"]["slm"], split_fingerprint(split), *dp)
    llm_key = config_key(base_key, c["llm"], c["eval"], c["round"]["generate"])
    zerogen_key = config_key(llm_key, zerogen_budget(cfg), c["round"]["filter"], c["round"]["enhance"],
                             c["continue_on"])
    return base_key, llm_key, zerogen_key


def silo_budgets(cfg: SimConfig, split: Split) -> dict:
    """One ε budget per silo when `privacy.enabled`: its silo-only SLM, every round's continuation
    and the final sync are the trainings it is spread over."""
    if not cfg.privacy.enabled:
        return {}
    from crosslm_shared.dp import PrivacyBudget

    planned = 1 + (cfg.privacy.rounds or cfg.rounds) + int(cfg.final_sync)
    return {s.name: PrivacyBudget(cfg.privacy, n_records=len(s.train), planned=planned, silo=s.name)
            for s in split.silos}


def split_fingerprint(split: Split) -> str:
    parts = [split.llm_test, split.judge_train] + [p for s in split.silos for p in (s.train, s.val, s.test)]
    return config_key([[list(p.texts), list(p.labels)] for p in parts])


def _round_totals(silos: dict) -> dict:
    vals = list(silos.values())
    stages: dict[str, float] = {}
    for v in vals:
        for k, s in v["seconds_per_stage"].items():
            stages[k] = stages.get(k, 0.0) + s
    return {
        "generated": sum(v["generated"] for v in vals),
        "kept": sum(v["kept"] for v in vals),
        "reward_mean": float(np.mean([v["reward_mean"] for v in vals])),
        "kl": float(np.mean([v["kl"] for v in vals])),
        "distinct_2": float(np.mean([v["distinct_2"] for v in vals])),
        "truncated": sum(v["truncated"] for v in vals),
        # of every text generated in the round; rounds from before 2026-12-07 have no rate
        **({"truncated_rate": sum(v["truncated"] for v in vals) / max(1, sum(v["generated"] for v in vals))}
           if all("truncated_rate" in v for v in vals) else {}),
        **{k: float(np.nanmean([v[k] for v in vals])) for k in ("judge_on_label", "judge_on_label_kept", "reward_auc",
                                                                 "llm_weight")
           if all(k in v for v in vals) and not all(np.isnan(v[k]) for v in vals)},
        "seconds_per_stage": stages,
    }


def _dump_samples(path: Path, res) -> None:
    keep = set(res.keep)
    with open(path, "w") as fh:
        for i, s in enumerate(res.samples):
            fh.write(json.dumps({"text": s.text, "label": s.label, "reward": float(res.scores.reward[i]),
                                 "advantage": float(res.scores.advantage[i]), "kept": i in keep,
                                 "truncated": s.truncated, "end": s.end, "repaired": s.repaired}) + "\n")
