"""Who knows the labels of a study's synthetic texts: the SLMs' reward, or the untouched LLM?

Reads one seed's CrossLM samples (samples-r*.jsonl) and the study's cached judge, and prints
each score's AUC for the texts the judge calls on-label, and the judge's on-label rate of the
top half per label by each score, alone and mixed as the filter mixes them (docs/results.md):

    .venv/bin/python scripts/scorer_probe.py docs/runs/study-rt 0 [examples/rt-4silo.toml]

Needs the study's cache (`DIR/cache/judge-*`), which a fresh clone does not hold: rerun the
study's seed first (it rebuilds the cache and skips the finished runs).
"""
import glob
import json
import sys
from pathlib import Path

import numpy as np, torch
from crosslm_shared.logs import quiet_ml_logging
quiet_ml_logging()
from crosslm_server.method.config import load_config
from crosslm_server.method.evaluate import auc
from crosslm_server.method.llm import load_llm
from crosslm_server.experiments.simulate import cache_keys
from crosslm_shared.data import load_examples, split_task
from crosslm_server.method.prompts import batched_label_logits
from crosslm_shared.slm import load_slm
from crosslm_shared.tasks import load_task

study, seed = sys.argv[1], int(sys.argv[2])
cfg = load_config(sys.argv[3] if len(sys.argv) > 3 else "examples/rt-4silo.toml", [f"seed={seed}"])
task = load_task(cfg.task)
_, llm_key, _ = cache_keys(cfg, split_task(load_examples(task), task.num_labels, cfg.split, seed=seed))
judge_dir = Path(study) / "cache" / f"judge-{llm_key}"
if not judge_dir.exists():
    sys.exit(f"{judge_dir} is missing: rerun the study's seed {seed} to rebuild the cache")
judge = load_slm(judge_dir)
rows = []
for f in sorted(glob.glob(f"{study}/runs/crosslm/seed-{seed}/samples-r*.jsonl")):
    rows += [json.loads(l) | {"file": f.split("/")[-1]} for l in open(f)]
texts = [r["text"] for r in rows]; labels = np.array([r["label"] for r in rows])
hits = judge.predict_proba(texts).argmax(1) == labels
llm = load_llm(cfg.llm)
with llm.model.disable_adapter():
    lg = batched_label_logits(llm, task, texts)
p = torch.softmax(lg, -1).numpy()
p_lab = p[np.arange(len(labels)), labels]
# prior-corrected: the LLM leans "negative"; centre each label's log-prob over the texts
lc = (lg - lg.mean(0, keepdim=True)); pc = torch.softmax(lc, -1).numpy()[np.arange(len(labels)), labels]
rew = np.array([r["reward"] for r in rows]); kept = np.array([r["kept"] for r in rows])
print(f"n={len(rows)} judge on-label all {hits.mean():.3f} kept {hits[kept].mean():.3f}")
print(f"AUC vs judge: SLM reward {auc(rew, hits):.3f}  LLM p(y|x) {auc(p_lab, hits):.3f}  LLM centred {auc(pc, hits):.3f}")
# the filter's score with round.filter.llm_weight = w: (1 - w) * SLM ensemble + w * LLM centred
mixes = {w: (1 - w) * (rew + 1) / 2 + w * pc for w in (0.25, 0.5, 0.75)}
print("AUC vs judge, mixed: " + "  ".join(f"w={w} {auc(m, hits):.3f}" for w, m in mixes.items()))
for name, s in (("slm", rew), ("llm", p_lab), ("llm_c", pc), *((f"mix w={w}", m) for w, m in mixes.items())):
    for lab in (0, 1):
        idx = np.flatnonzero(labels == lab); top = idx[np.argsort(-s[idx])][: len(idx) // 2]
        print(f"  keep top half by {name} label {lab}: judge on-label {hits[top].mean():.3f} (all {hits[idx].mean():.3f})")
# what the server can see without a judge: how well each score predicts the label the text was
# generated for, and the LLM's share that round.filter.llm_weight = "auto" gives it
from crosslm_server.method.reward import auto_llm_weight, label_agreement

p1 = np.where(labels == 1, (rew + 1) / 2, 1 - (rew + 1) / 2)  # binary: S(1|x) from the reward 2 S(y|x) - 1
slm_probs = np.stack([1 - p1, p1], 1)
llm_probs = torch.softmax(lc, -1).numpy()
if task.num_labels == 2:
    print(f"AUC vs the intended label (no judge): SLM {label_agreement(slm_probs, labels):.3f}  "
          f"LLM centred {label_agreement(llm_probs, labels):.3f}; "
          f"the LLM's share, all texts: {auto_llm_weight(slm_probs, llm_probs, labels):.2f}; per submission:")
    files = np.array([r["file"] for r in rows])
    for f in sorted(set(files)):
        m = files == f
        print(f"    {f}: SLM {label_agreement(slm_probs[m], labels[m]):.2f} LLM {label_agreement(llm_probs[m], labels[m]):.2f} "
              f"share {auto_llm_weight(slm_probs[m], llm_probs[m], labels[m]):.2f}")
