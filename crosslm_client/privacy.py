"""The silo's privacy policy: its ε budget (`[privacy]`) and the audit before upload (`[audit]`).

The budget lives in ``<output_dir>/privacy/ledger.json``: every DP training the silo ran, so a
restarted daemon keeps paying from what is left instead of starting afresh. Before every upload
the daemon checks that the model's ε is within the budget and, with `[audit] before_upload`, runs
the membership-inference audit on exactly that model; a model past either bound stays in the silo
(PrivacyError, exit code 6). `crosslm-client audit` runs the same audit on demand.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from crosslm_client.config import SiloConfig
from crosslm_client.models import Examples
from crosslm_shared.errors import ConfigError, PrivacyError

log = logging.getLogger(__name__)

LEDGER = Path("privacy") / "ledger.json"


def open_budget(config: SiloConfig, family: Any, *, n_records: int):
    """The silo's PrivacyBudget, or None when `[privacy] enabled` is false."""
    p = config.privacy
    if not p.enabled:
        return None
    if not getattr(family, "supports_dp", False):
        raise ConfigError(f"[privacy] enabled = true, but the model family of [silo] arch={config.silo.arch!r} "
                          "cannot train with DP-SGD; use minilm or mpnet4 (crosslm_client.models.SharedFamily)")
    from crosslm_shared.dp import PrivacyBudget

    rounds = p.rounds or config.rounds.count
    if rounds == 0:
        raise ConfigError("[privacy] rounds = 0 and [rounds] count = 0 (forever): a DP budget must be spread over "
                          "a known number of rounds; set [privacy] rounds")
    return PrivacyBudget(p, n_records=n_records, planned=1 + rounds, path=config.output_dir / LEDGER,
                         silo=config.silo.name)


def audit_model(config: SiloConfig, model: Any, train: Examples, held: Examples) -> dict:
    """The membership-inference audit of ``model``: members = the training split, non-members = held-out."""
    from crosslm_shared.audit import loss_attack

    return loss_attack(model, train, held, config.audit)


def before_upload(config: SiloConfig, family: Any, model_dir: Path, train: Examples, held: Examples,
                  budget) -> dict[str, Any]:
    """What the round report states about the model about to be sent; PrivacyError to stop it."""
    s, out = config.silo, {}
    out["privacy"] = {**budget.summary(), "epsilon": budget.check_send()} if budget else {"dp": False}
    if config.audit.before_upload:
        audit = audit_model(config, family.load(config, model_dir), train, held)
        out["audit"] = audit
        log.info("silo %s: membership-inference audit of the model to send: AUC %.3f ± %.3f, TPR@1%%FPR %.3f "
                 "(%d members, %d non-members)", s.name, audit["auc"], audit.get("auc_se", float("nan")),
                 audit["tpr_at_1pct_fpr"], audit["n_members"], audit["n_nonmembers"])
        bound = config.audit.max_auc
        if bound is not None and audit["auc"] > bound:
            raise PrivacyError(f"silo {s.name}: refusing to send: the membership-inference AUC of the model is "
                               f"{audit['auc']:.3f} > [audit] max_auc = {bound:g}; it stays in the silo. Train with "
                               "[privacy] enabled (or a smaller epsilon), or fewer epochs", report=out)
    return out


def latest_model_dir(config: SiloConfig) -> Path:
    """The model the daemon would send next: its latest kept round folder."""
    folders = sorted((config.output_dir / "models").glob("round-[0-9][0-9][0-9]"))
    if not folders:
        raise ConfigError(f"no trained model under {config.output_dir / 'models'}; run the daemon first "
                          "or pass --model FOLDER")
    return folders[-1]
