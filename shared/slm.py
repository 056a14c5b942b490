"""Small language models (SLMs): the silos' sequence classifiers.

Both sides use this module: a silo trains and evaluates its SLM on private data, the
server scores synthetic texts with it and fine-tunes it on the kept synthetic set. An SLM
travels as a ``save_pretrained`` folder plus ``crosslm.json`` (labels, architecture,
calibration temperature); no pickle anywhere.

Every arm of every comparison trains through :func:`train_selected`, so the silo-only
baseline gets the same hyperparameter selection on the silo's validation split as CrossLM
(an under-trained baseline fakes a gain: DESIGN.md §2).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from crosslm_shared import assets
from crosslm_shared.errors import ConfigError
from crosslm_shared.slm_config import SLMTrainConfig

log = logging.getLogger(__name__)

META_FILE = "crosslm.json"
ARCHS = {
    # name -> (folder finder, config overrides)
    "minilm": (assets.minilm_dir, {}),
    "mpnet4": (assets.mpnet_dir, {"num_hidden_layers": 4}),
}


def device() -> torch.device:
    """CUDA when present, else CPU: one choice for the SLMs and the LLM alike."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def balanced_accuracy(pred: Sequence[int], labels: Sequence[int]) -> float:
    """Mean recall over the labels present in ``labels``: a constant answer scores 1 / labels."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    return float(np.mean([(pred[labels == y] == y).mean() for y in np.unique(labels)])) if labels.size else 0.0


@dataclass
class SLM:
    """A sequence classifier with its tokenizer, label names and calibration temperature."""

    model: nn.Module
    tokenizer: object
    labels: list[str]
    arch: str
    temperature: float = 1.0
    info: dict = field(default_factory=dict)

    @torch.no_grad()
    def logits(self, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 64) -> torch.Tensor:
        self.model.eval()
        out = []
        dev = next(self.model.parameters()).device
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                 max_length=max_length, return_tensors="pt").to(dev)
            out.append(self.model(**enc).logits.float().cpu())
        if not out:
            return torch.zeros(0, len(self.labels))
        return torch.cat(out)

    def predict_proba(self, texts: Sequence[str], *, calibrated: bool = True) -> np.ndarray:
        """Softmax probabilities, divided by the calibration temperature unless ``calibrated=False``."""
        t = self.temperature if calibrated else 1.0
        return torch.softmax(self.logits(texts) / t, dim=-1).numpy()

    def evaluate(self, texts: Sequence[str], labels: Sequence[int], *, metric: str = "accuracy") -> float:
        """Accuracy, or balanced accuracy (mean recall over the labels present in ``labels``)."""
        if not len(texts):
            return float("nan")
        pred = self.logits(texts).argmax(-1).numpy()
        y = np.asarray(labels)
        if metric == "balanced_accuracy":
            return balanced_accuracy(pred, y)
        return float((pred == y).mean())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        meta = {"labels": self.labels, "arch": self.arch, "temperature": self.temperature, "info": self.info}
        (path / META_FILE).write_text(json.dumps(meta, indent=2))
        return path

    def clone(self) -> "SLM":
        return SLM(copy.deepcopy(self.model), self.tokenizer, list(self.labels), self.arch,
                   self.temperature, dict(self.info))


def new_slm(arch: str, labels: Sequence[str]) -> SLM:
    """A fresh classifier (new head) from the pretrained encoder ``arch`` or a local folder."""
    if arch in ARCHS:
        finder, overrides = ARCHS[arch]
        folder = finder()
    elif Path(arch).is_dir():
        folder, overrides = Path(arch), {}
    else:
        raise ConfigError(f"SLM arch {arch!r} is unknown; use one of {sorted(ARCHS)} or a model folder")
    config = AutoConfig.from_pretrained(folder, num_labels=len(labels), **overrides,
                                        id2label=dict(enumerate(labels)),
                                        label2id={n: i for i, n in enumerate(labels)})
    model = AutoModelForSequenceClassification.from_pretrained(folder, config=config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return SLM(model.to(device()), tokenizer, list(labels), arch)


def load_slm(path: str | Path) -> SLM:
    """Load an SLM saved by :meth:`SLM.save` (safetensors only)."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.exists():
        raise ConfigError(f"{path} is not an SLM folder: {META_FILE} is missing")
    meta = json.loads(meta_path.read_text())
    model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return SLM(model.to(device()), tokenizer, list(meta["labels"]), meta.get("arch", "unknown"),
               float(meta.get("temperature", 1.0)), dict(meta.get("info", {})))


def _targets(labels: Sequence[int] | np.ndarray, k: int) -> torch.Tensor:
    arr = np.asarray(labels)
    if arr.ndim == 2:
        return torch.as_tensor(arr, dtype=torch.float32)
    return torch.nn.functional.one_hot(torch.as_tensor(arr, dtype=torch.long), k).float()


def class_weights(y: torch.Tensor, cfg: SLMTrainConfig) -> torch.Tensor:
    """Per-example loss weights: 1, or n / (K · count of the example's label), capped."""
    if cfg.class_weighting == "none":
        return torch.ones(len(y))
    hard = y.argmax(-1)
    counts = torch.bincount(hard, minlength=y.shape[1]).float()
    per_label = (len(y) / (y.shape[1] * counts.clamp(min=1))).clamp(max=cfg.max_class_weight)
    return per_label[hard]


HEAD_PARTS = ("classifier", "pooler")


def param_groups(model: nn.Module, lr: float, head_lr_mult: float) -> list[dict]:
    """The encoder at ``lr``; the head (classifier and pooler) at ``lr * head_lr_mult``."""
    head, body = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if any(part in name.split(".") for part in HEAD_PARTS) else body).append(p)
    return [g for g in ({"params": body, "lr": lr}, {"params": head, "lr": lr * head_lr_mult}) if g["params"]]


def _shuffled_batches(n: int, batch_size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen).tolist()
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def fit(slm: SLM, texts: Sequence[str], targets, *, lr: float, epochs: int, cfg: SLMTrainConfig,
        val: tuple[Sequence[str], Sequence[int]] | None = None, desc: str = "train SLM",
        progress: Callable[[int, int], None] | None = None, dp=None) -> dict:
    """Fine-tune ``slm`` in place on (texts, targets); targets are label ids or soft distributions.

    With ``val``, the state of the epoch with the best validation accuracy is kept (ties go
    to the later epoch) and returned figures describe it. With ``dp`` (a crosslm_shared.dp.Plan)
    every step is DP-SGD (crosslm_shared.dp.PrivateRun): Poisson batches, per-example clipping
    and noise; the loss is then the plain mean (class weights come from the private label
    counts, so they would couple one record's gradient to every other's).
    """
    if len(texts) == 0:
        return {"epochs": 0, "val_acc": slm.evaluate(*val, metric=cfg.select_metric) if val else float("nan")}
    y = _targets(targets, len(slm.labels))
    w = class_weights(y, cfg)
    dev = next(slm.model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(param_groups(slm.model, lr, cfg.head_lr_mult), weight_decay=cfg.weight_decay)
    run = None
    if dp is not None:
        from crosslm_shared.dp import PrivateRun

        run = PrivateRun(slm.model, opt, len(texts), dp, seed=cfg.seed)
        opt = run.optimizer
    steps_per_epoch = math.ceil(len(texts) / cfg.batch_size)
    total = steps_per_epoch * epochs
    warm = max(1, int(total * cfg.warmup_fraction))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    best = (-1.0, 0, None)
    bar = tqdm(total=total, desc=desc, leave=False, disable=None)
    with run or contextlib.nullcontext():
        for epoch in range(1, epochs + 1):
            slm.model.train()
            for idx in (run.batches() if run else _shuffled_batches(len(texts), cfg.batch_size, gen)):
                # an empty Poisson batch still takes its noisy step: one blank text with zero loss
                enc = slm.tokenizer([texts[j] for j in idx] or [""], padding=True, truncation=True,
                                    max_length=cfg.max_length, return_tensors="pt").to(dev)
                logits = slm.model(**enc).logits.float()
                if not idx:
                    loss = logits.sum() * 0.0
                else:
                    per_example = -(y[idx].to(dev) * torch.log_softmax(logits, -1)).sum(-1)
                    loss = per_example.mean() if run else (w[idx].to(dev) * per_example).sum() / w[idx].sum().to(dev)
                loss.backward()
                if run is None:
                    torch.nn.utils.clip_grad_norm_(slm.model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                bar.update(1)
                if progress:
                    progress(bar.n, total)
            if val is not None:
                acc = slm.evaluate(*val, metric=cfg.select_metric)
                if acc >= best[0]:
                    best = (acc, epoch, {k: v.detach().clone() for k, v in slm.model.state_dict().items()})
    bar.close()
    dp_info = {"dp_steps": run.steps_taken} if run else {}
    if val is None:
        return {"epochs": epochs, **dp_info}
    slm.model.load_state_dict(best[2])
    return {"epochs": best[1], "val_acc": best[0], **dp_info}


def train_selected(base: str | SLM, labels: Sequence[str], train: tuple[Sequence[str], object],
                   val: tuple[Sequence[str], Sequence[int]], cfg: SLMTrainConfig, *,
                   desc: str = "SLM", privacy=None) -> tuple[SLM, dict]:
    """Train from ``base`` (an arch name, or an SLM to continue from) once per learning rate in
    the grid and return the model with the best validation accuracy, calibrated on ``val``.

    With ``privacy`` (a crosslm_shared.dp.PrivacyBudget) every run is DP-SGD; the training's
    cost (all runs: each saw the records) is recorded and ``info["privacy"]`` states ε so far.
    """
    plan = None
    if privacy is not None:
        plan = privacy.plan(n=len(train[0]), batch_size=cfg.batch_size, epochs=cfg.max_epochs,
                            runs=len(cfg.lrs), what=desc)
    best: tuple[float, SLM | None, dict] = (-1.0, None, {})
    steps = 0
    for lr in cfg.lrs:
        torch.manual_seed(cfg.seed)
        slm = base.clone() if isinstance(base, SLM) else new_slm(base, labels)
        info = fit(slm, train[0], train[1], lr=lr, epochs=cfg.max_epochs, cfg=cfg, val=val,
                   desc=f"{desc} lr={lr:g}", dp=plan)
        steps += info.pop("dp_steps", 0)
        log.debug("%s lr=%g -> val acc %.3f (epoch %d)", desc, lr, info["val_acc"], info["epochs"])
        if info["val_acc"] > best[0]:
            best = (info["val_acc"], slm, {"lr": lr, **info})
    slm = best[1]
    slm.temperature = calibrate_temperature(slm, *val)
    slm.info = {**best[2], "temperature": slm.temperature}
    if privacy is not None:
        privacy.record(plan, steps=steps, what=desc)
        slm.info["privacy"] = privacy.summary()
    return slm, slm.info


def calibrate_temperature(slm: SLM, texts: Sequence[str], labels: Sequence[int]) -> float:
    """Temperature scaling (Guo et al. 2017): the T in [0.05, 20] minimising NLL on held-out data.

    Small-data SLMs are underconfident (DESIGN.md §2, step 4); without calibration their scores
    crowd around 1/K and no absolute threshold separates good samples from bad.
    """
    if len(texts) < 2:
        return 1.0
    logits = slm.logits(texts)
    y = torch.as_tensor(list(labels), dtype=torch.long)
    grid = torch.exp(torch.linspace(math.log(0.05), math.log(20.0), 121))
    nll = torch.stack([nn.functional.cross_entropy(logits / t, y) for t in grid])
    return float(grid[int(nll.argmin())])


def with_synthetic(train: tuple[Sequence[str], Sequence[int]], synthetic: tuple[Sequence[str], np.ndarray] | None,
                   k: int) -> tuple[list[str], np.ndarray]:
    """Private examples (one-hot) followed by synthetic ones (their soft or hard targets)."""
    texts = list(train[0])
    targets = _targets(train[1], k).numpy()
    if synthetic is not None and len(synthetic[0]):
        texts += list(synthetic[0])
        targets = np.concatenate([targets, _targets(synthetic[1], k).numpy()])
    return texts, targets


def synthetic_validation(val: tuple[Sequence[str], Sequence[int]],
                         synthetic: tuple[Sequence[str], np.ndarray] | None, k: int, min_per_label: int, *,
                         seed: int = 0) -> tuple[tuple[list[str], list[int]], tuple[list[str], np.ndarray] | None]:
    """Top up the labels the real validation split lacks with held-out synthetic examples.

    For each label with fewer than ``min_per_label`` real validation examples, synthetic
    examples whose target argmax is that label move (a random draw, not the filter's best)
    from the training set to the validation set, up to ``min_per_label`` minus the real
    count and never more than half of that label's synthetic examples. Returns the
    validation split and the synthetic set left for training.
    """
    texts, labels = list(val[0]), list(val[1])
    if synthetic is None or not len(synthetic[0]) or min_per_label == 0:
        return (texts, labels), synthetic
    syn_texts = list(synthetic[0])
    syn_targets = _targets(synthetic[1], k).numpy()
    syn_labels = syn_targets.argmax(1)
    real = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for lab in range(k):
        need = min_per_label - int(real[lab])
        pool = np.flatnonzero(syn_labels == lab)
        take = min(need, len(pool) // 2)
        if take > 0:
            held += rng.choice(pool, size=take, replace=False).tolist()
    if not held:
        return (texts, labels), synthetic
    rest = np.setdiff1d(np.arange(len(syn_texts)), held)
    texts += [syn_texts[i] for i in held]
    labels += [int(syn_labels[i]) for i in held]
    return (texts, labels), ([syn_texts[i] for i in rest], syn_targets[rest])


def adopt_if_better(current: SLM, returned: SLM, train: tuple[Sequence[str], Sequence[int]],
                    val: tuple[Sequence[str], Sequence[int]], cfg: SLMTrainConfig, *,
                    synthetic: tuple[Sequence[str], np.ndarray] | None = None,
                    desc: str = "continue", inspect: Callable[[SLM], None] | None = None,
                    privacy=None) -> tuple[SLM, dict]:
    """The silo's side of a round: continue the returned SLM on private data (plus the returned
    synthetic set, if given), with the same selection as every baseline, then keep whichever of
    it and ``current`` is better on the validation split (ties go to the newer model).

    With a synthetic set, labels the validation split lacks are topped up from it
    (:func:`synthetic_validation`); both models are judged on the same topped-up split.
    ``inspect`` sees the continued model whether or not it is kept (a study measures what the
    gate earns on test data the silo never sees). ``privacy``: as for :func:`train_selected`
    (the private records are in every batch; the synthetic ones are post-processing).
    """
    k = len(current.labels)
    val, synthetic = synthetic_validation(val, synthetic, k, cfg.min_val_per_label, seed=cfg.seed)
    data = with_synthetic(train, synthetic, k)
    continued, info = train_selected(returned, current.labels, data, val, cfg, desc=desc, privacy=privacy)
    if inspect is not None:
        inspect(continued)
    current_acc = current.evaluate(*val, metric=cfg.select_metric)
    adopted = info["val_acc"] >= current_acc
    return (continued if adopted else current), {
        "adopted": adopted, "val_acc_current": current_acc, "val_acc_returned": info["val_acc"],
        "n_val": len(val[0]), **info}
