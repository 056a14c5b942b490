"""The membership-inference audit (crosslm_shared.audit, `crosslm-client audit`): it must tell an
overfit model from an untrained one, in both directions, so a broken attack fails here."""
import json

import numpy as np
import pytest

from crosslm_client.cli import main
from crosslm_shared.data import Examples, heldout_split
from crosslm_shared.audit import auc_and_tpr, loss_attack
from crosslm_shared.errors import ConfigError, DataError
from crosslm_shared.privacy import AuditConfig
from crosslm_shared.slm import fit
from crosslm_shared.slm_config import SLMTrainConfig
from fakes.tiny_shared_slm import random_records, tiny_shared_slm

LABELS = ["neg", "pos"]


ALL = random_records(160, seed=3)


@pytest.fixture(scope="module")
def records():
    """(members, non-members): the silo daemon's split of ALL (heldout_fraction 0.5, seed 0)."""
    return tuple(part.pair() for part in heldout_split(Examples(tuple(ALL[0]), tuple(ALL[1])), fraction=0.5, seed=0))


@pytest.fixture(scope="module")
def overfit(records, tmp_path_factory):
    slm = tiny_shared_slm(LABELS, tmp_path_factory.mktemp("tok"))
    cfg = SLMTrainConfig(lrs=(3e-3,), batch_size=16, class_weighting="none", warmup_fraction=0.0, head_lr_mult=1.0)
    fit(slm, *records[0], lr=3e-3, epochs=30, cfg=cfg)
    return slm


def test_audit_finds_an_overfit_model(records, overfit):
    members, nonmembers = records
    assert overfit.evaluate(*members) > 0.9  # it memorised its random labels
    result = loss_attack(overfit, members, nonmembers, AuditConfig(bootstrap=200))
    assert result["auc"] > 0.68 and result["auc_ci95"][0] > 0.55
    n_out = len(nonmembers[0])
    assert (result["n_members"], result["n_nonmembers"]) == (160 - n_out, n_out) and result["fpr_resolution"] == 1 / n_out
    assert 0 <= result["tpr_at_1pct_fpr"] <= 1 and result["auc_se"] > 0


def test_audit_finds_nothing_in_an_untrained_model(records, tmp_path):
    fresh = tiny_shared_slm(LABELS, tmp_path / "tok", seed=5)
    result = loss_attack(fresh, *records, AuditConfig(bootstrap=200))
    assert abs(result["auc"] - 0.5) < 0.12
    assert result["auc_ci95"][0] < 0.5 < result["auc_ci95"][1]


def test_auc_and_tpr_on_known_scores():
    assert auc_and_tpr(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == (1.0, 1.0)
    assert auc_and_tpr(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == (0.0, 0.0)


def test_audit_refuses_too_few_records_and_bad_config(overfit):
    with pytest.raises(DataError, match="at least 2 members"):
        loss_attack(overfit, (["good"], [1]), (["bad", "dull"], [0, 0]))
    with pytest.raises(ConfigError, match="max_auc"):
        AuditConfig(max_auc=0.3)


def _silo(tmp_path, *, max_auc):
    rows = [{"text": t, "label": LABELS[y]} for t, y in zip(*ALL)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = tmp_path / "silo.toml"
    cfg.write_text('[silo]\nname = "silo-a"\nlabels = ["neg", "pos"]\ndata = "data.jsonl"\nheldout_fraction = 0.5\n'
                   'arch = "fakes.tiny_shared_slm:TINY_SHARED"\n[server]\nplaintext_dev_mode = true\n'
                   f'[audit]\nmax_auc = {max_auc}\nbootstrap = 50\n')
    return cfg


@pytest.mark.e2e
@pytest.mark.privacy
def test_audit_command_reports_and_applies_the_bound(tmp_path, records, overfit):
    """`crosslm-client audit` audits on the daemon's split (members = the silo's training records),
    writes JSON, and exits 6 when the AUC exceeds [audit] max_auc; an untrained model passes."""
    cfg = _silo(tmp_path, max_auc=0.6)
    model = overfit.save(tmp_path / "overfit")
    fresh = tiny_shared_slm(LABELS, tmp_path / "tok2", seed=5).save(tmp_path / "fresh")
    assert main(["audit", "--config", str(cfg), "--model", str(fresh), "--out", str(tmp_path / "fresh.json")]) == 0
    assert main(["audit", "--config", str(cfg), "--model", str(model), "--out", str(tmp_path / "overfit.json")]) == 6
    low, high = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("fresh", "overfit"))
    assert low["silo"] == "silo-a" and low["n_members"] == len(records[0][0])
    assert low["auc"] <= 0.6 < high["auc"]
    assert main(["audit", "--config", str(tmp_path / "missing.toml")]) == 2
