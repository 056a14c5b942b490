"""DP-SGD for the silo's SLM (Opacus) and the silo's ε budget, composed over every training.

Every training that touches private records (the first SLM, and the continuation after each
round on private + returned synthetic data) runs under :class:`PrivateRun`: Poisson-sampled
batches, per-example gradients clipped to C, Gaussian noise σ·C, all by Opacus. One training
tries every learning rate of the grid on the same records, so its cost is the steps of all of
them. :class:`PrivacyBudget` keeps the history of (σ, sample rate, steps) on disk, asks Opacus's
accountant for the ε it composes to, and picks σ for the next training so that ε after it is
the budget's even share (k of K planned trainings: ε·k/K). Past the budget it refuses.

What Opacus cannot handle: a BERT/MPNet embedding table sees inputs with no batch dimension
(position ids of shape (1, L), MPNet's relative attention bias of shape (L, L)), so per-example
gradients for it are wrong or fail. Under DP the embedding tables (word, position, token type,
MPNet's relative_attention_bias) are frozen at their public pretrained values. Of the rest, the
top `[privacy] train_layers` encoder layers, the pooler and the head train privately (-1: every
layer and the embedding LayerNorm too): the noise is spread over every trainable parameter, so
fewer of them leave more signal in each. docs/privacy.md.
"""
from __future__ import annotations

import json
import logging
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from crosslm_shared.atomic import write_text_atomic
from crosslm_shared.errors import AssetMissingError, PrivacyError
from crosslm_shared.privacy import PrivacyConfig

log = logging.getLogger(__name__)
# silenced inside a run: Opacus's reminder that its default RNG is not cryptographically secure
# (docs/privacy.md says so), and torch's note that the first hooked module's inputs need no
# gradient (the frozen embeddings)
QUIET = ("Secure RNG turned off", "Full backward hook is firing when gradients are computed")


def _quiet() -> warnings.catch_warnings:
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)
    return ctx

MAX_SIGMA = 1e4  # a σ above this trains nothing useful: the budget left is too small
# a table indexed by something other than a batch of examples (see the module docstring)
FROZEN_UNDER_DP = (nn.Embedding,)


def _opacus():
    try:
        import opacus
        from opacus.accountants import create_accountant
    except ImportError as e:
        raise AssetMissingError(f"[privacy] enabled = true needs Opacus: {e}; install CrossLM with the "
                                "'privacy' extra (scripts/bootstrap installs it)") from e
    return opacus, create_accountant


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """ε that Opacus's accountant composes ``history`` [(σ, sample rate, steps), ...] to, at ``delta``."""
    if not history:
        return 0.0
    _, create_accountant = _opacus()
    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True)
class Plan:
    """One private training: σ, the sample rate q = B / n and the steps of all its runs."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    train_layers: int = -1  # top encoder layers trained (-1 = all); see freeze_for_dp


class PrivacyBudget:
    """The silo's ε budget over its life, kept in ``path`` (JSON) so a restart cannot reset it.

    ``planned`` trainings share the budget: the k-th gets the σ that brings the composed ε to
    ε·k/planned. ``plan`` refuses (PrivacyError) a training past the last planned one or one
    that would exceed the budget; ``check_send`` refuses to send a model whose ε exceeds it.
    """

    def __init__(self, cfg: PrivacyConfig, *, n_records: int, planned: int, path: Path | None = None,
                 silo: str = "silo"):
        if planned < 1:
            raise PrivacyError(f"silo {silo}: a DP budget must cover a known number of trainings; set "
                               "[privacy] rounds when the daemon runs forever ([rounds] count = 0)")
        self.cfg, self.planned, self.path, self.silo = cfg, planned, path, silo
        self.delta = cfg.delta_for(n_records)
        self.entries: list[dict] = []
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        state = json.loads(path.read_text())
        if abs(state["epsilon_budget"] - self.cfg.epsilon) > 1e-12 or state["delta"] != self.delta:
            log.warning("silo %s: the DP ledger %s was kept under ε=%s, δ=%s; the config now says ε=%s, δ=%s. "
                        "The trainings already recorded still count", self.silo, path, state["epsilon_budget"],
                        state["delta"], self.cfg.epsilon, self.delta)
        self.entries = list(state["entries"])

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.entries]

    def spent(self) -> float:
        """ε composed over every recorded training, at this budget's δ."""
        return epsilon_of(self.history, self.delta, self.cfg.accountant)

    def plan(self, *, n: int, batch_size: int, epochs: int, runs: int, what: str) -> Plan:
        """σ for the next training: ``runs`` runs (one per learning rate) of ``epochs`` epochs on ``n``
        records (private and synthetic) at expected batch ``batch_size``."""
        k = len(self.entries) + 1
        if k > self.planned:
            raise PrivacyError(
                f"silo {self.silo}: refusing to train ({what}): the ε budget {self.cfg.epsilon:g} (δ={self.delta:g}) "
                f"was planned for {self.planned} trainings and {k - 1} are spent (ε={self.spent():.3f}); "
                "training again would exceed it. Stop here, or raise [privacy] epsilon / rounds knowingly "
                f"(the ledger is {self.path})")
        per_epoch = steps_per_epoch(n, batch_size)
        q, steps = 1.0 / per_epoch, runs * epochs * per_epoch  # Opacus samples at q = 1 / batches per epoch
        target = self.cfg.epsilon * k / self.planned
        sigma = self._sigma_for(target, q, steps)
        if sigma is None:
            raise PrivacyError(
                f"silo {self.silo}: refusing to train ({what}): the ε left ({self.cfg.epsilon - self.spent():.3f} of "
                f"{self.cfg.epsilon:g}) cannot pay for {steps} steps at sample rate {q:.3g} with noise σ ≤ {MAX_SIGMA:g}; "
                "use fewer epochs or learning rates, or a larger budget")
        return Plan(sigma, q, steps, self.cfg.max_grad_norm, self.cfg.train_layers)

    def _sigma_for(self, target: float, q: float, steps: int) -> float | None:
        """The smallest σ (to 1 %) with ε(history + (σ, q, steps)) ≤ target; None if none ≤ MAX_SIGMA."""
        def eps(sigma: float) -> float:
            return epsilon_of(self.history + [(sigma, q, steps)], self.delta, self.cfg.accountant)

        hi = 1.0
        while eps(hi) > target:
            hi *= 2
            if hi > MAX_SIGMA:
                return None
        lo = 0.0
        while hi - lo > 0.01 * hi:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if eps(mid) <= target else (mid, hi)
        return hi

    def record(self, plan: Plan, *, steps: int, what: str) -> float:
        """Add a finished training (the steps actually taken) and return ε spent so far."""
        self.entries.append({"what": what, "noise_multiplier": plan.noise_multiplier,
                             "sample_rate": plan.sample_rate, "steps": int(steps),
                             "max_grad_norm": plan.max_grad_norm})
        spent = self.spent()
        self.entries[-1]["epsilon_after"] = spent
        self._save()
        log.info("silo %s: DP training %s: σ=%.3f, q=%.3g, %d steps; ε spent %.3f of %g (δ=%g)", self.silo, what,
                 plan.noise_multiplier, plan.sample_rate, steps, spent, self.cfg.epsilon, self.delta)
        return spent

    def check_send(self) -> float:
        """ε of the model about to leave the silo; PrivacyError past the budget."""
        spent = self.spent()
        if spent > self.cfg.epsilon * (1 + 1e-6):
            raise PrivacyError(f"silo {self.silo}: refusing to send: the model's ε = {spent:.3f} exceeds the budget "
                               f"{self.cfg.epsilon:g} (δ={self.delta:g}); it stays in the silo")
        return spent

    def summary(self) -> dict:
        """What the silo's report and bundle state: ε spent so far, the budget, δ, C and the trainings."""
        return {"dp": True, "epsilon": round(self.spent(), 4), "epsilon_budget": self.cfg.epsilon,
                "delta": self.delta, "max_grad_norm": self.cfg.max_grad_norm, "accountant": self.cfg.accountant,
                "trainings": len(self.entries), "planned_trainings": self.planned}

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps({"epsilon_budget": self.cfg.epsilon, "delta": self.delta,
                                                 "accountant": self.cfg.accountant, "entries": self.entries},
                                                indent=2))


LAYER = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")


def freeze_for_dp(model: nn.Module, train_layers: int = -1) -> list[nn.Parameter]:
    """Freeze every embedding table (the module docstring says why) and, with ``train_layers`` >= 0,
    every encoder layer below the top ``train_layers`` and the embedding LayerNorm; the pooler
    and head always train. Returns the parameters it froze."""
    frozen = [p for m in model.modules() if isinstance(m, FROZEN_UNDER_DP) for p in m.parameters()]
    if train_layers >= 0:
        layers = {n: int(m.group(1)) for n, _ in model.named_parameters() if (m := LAYER.search(n))}
        top = max(layers.values(), default=-1) + 1
        params = dict(model.named_parameters())
        frozen += [params[n] for n, i in layers.items() if i < top - train_layers]
        frozen += [p for n, p in params.items() if ".embeddings." in f".{n}"]
    frozen = [p for p in dict.fromkeys(frozen) if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


class PrivateRun:
    """One DP-SGD run of ``fit``: Opacus's hooks on the model, its optimizer and Poisson loader.

    Use as a context manager; on exit the hooks are removed and the embedding tables trainable
    again, so the model saves and clones as before. ``batches()`` yields one epoch of index
    lists (an empty Poisson batch is yielded as [] and must still be stepped: see ``fit``).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, n: int, plan: Plan, *, seed: int):
        opacus, _ = _opacus()
        self.model, self.n, self.plan = model, n, plan
        model.train()  # Opacus refuses a model in eval mode
        self.frozen = freeze_for_dp(model, plan.train_layers)
        for group in optimizer.param_groups:  # Opacus expects only trainable parameters
            group["params"] = [p for p in group["params"] if p.requires_grad]
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(n)),
                                             batch_size=math.ceil(n * plan.sample_rate))
        quiet = _quiet()
        try:
            engine = opacus.PrivacyEngine(accountant="rdp")
            self.hooks, self.optimizer, self.loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=plan.noise_multiplier,
                max_grad_norm=plan.max_grad_norm, poisson_sampling=True, wrap_model=False,
                noise_generator=torch.Generator().manual_seed(seed + 1))
        finally:
            quiet.__exit__(None, None, None)
        if len(self.loader) != round(1 / plan.sample_rate):
            raise PrivacyError(f"Opacus samples at 1/{len(self.loader)}, the plan at {plan.sample_rate:.4g}: "
                               "the accounting would not match the training")
        self.loader.batch_sampler.generator = torch.Generator().manual_seed(seed)
        self.engine = engine

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def batches(self) -> Iterator[list[int]]:
        for (idx,) in self.loader:
            yield idx.tolist()

    @property
    def steps_taken(self) -> int:
        return sum(h[2] for h in self.engine.accountant.history)

    def __enter__(self) -> "PrivateRun":
        self._warnings = _quiet()
        return self

    def __exit__(self, *exc) -> None:
        self._warnings.__exit__(None, None, None)
        self.hooks.cleanup()
        for p in self.frozen:
            p.requires_grad_(True)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Steps of one epoch under Poisson sampling at q = B / n (Opacus: 1 / q batches)."""
    return max(1, math.ceil(n / max(1, batch_size)))
