"""The silo daemon under a DP budget, over the wire: ε in every round report and in the bundle it
sends, the audit before upload, and a refusal (exit 6) past the budget, also after a restart."""
import json
import random

import pytest

from crosslm_client.cli import main
from service_helpers import address, server_config, start_server
from fakes.tiny_shared_slm import random_records

POS = ["good film", "great fun movie", "i love it", "the best story", "really nice plot", "very funny"]
NEG = ["bad film", "boring dull movie", "i hate it", "the worst story", "awful weak plot", "very poor"]


def write_silo(tmp_path, server, name, *, rounds, privacy, audit=""):
    rng = random.Random(name)
    rows = [{"text": f"{rng.choice(POS)} {rng.choice(POS)}", "label": "pos"} for _ in range(24)]
    rows += [{"text": f"{rng.choice(NEG)} {rng.choice(NEG)}", "label": "neg"} for _ in range(24)]
    (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f'output_dir = "{name}-out"\n[silo]\nname = "{name}"\ntask = "rt"\nlabels = ["neg", "pos"]\n'
                   f'data = "{name}.jsonl"\narch = "fakes.tiny_shared_slm:TINY_SHARED"\n[server]\n'
                   f'address = "{address(server)}"\nmax_attempts = 3\nbackoff_initial_s = 0.05\nplaintext_dev_mode = true\n'
                   f'[train]\nepochs = 1\nlrs = [0.001]\n[rounds]\ncount = {rounds}\n[privacy]\n{privacy}\n{audit}')
    return cfg


@pytest.fixture
def server(tmp_path):
    server = start_server(server_config(tmp_path / "server"))
    yield server
    server.stop(grace=1)


def _reports(out):
    return [json.loads(p.read_text()) for p in sorted((out / "reports").glob("round-*.json"))]


@pytest.mark.e2e
@pytest.mark.privacy
def test_daemon_states_epsilon_audits_and_refuses_past_the_budget(tmp_path, server):
    # the budget covers the first SLM and one round; the second round's continuation is refused
    cfg = write_silo(tmp_path, server, "silo-dp", rounds=2, privacy="enabled = true\nepsilon = 8.0\nrounds = 1",
                     audit="[audit]\nbefore_upload = true\nbootstrap = 20\n")
    assert main(["run", "--config", str(cfg)]) == 6
    out = tmp_path / "silo-dp-out"
    first, second = _reports(out)
    assert first["outcome"] == "ready" and first["privacy"]["dp"] is True
    assert 0 < first["privacy"]["epsilon"] < first["privacy_after"]["epsilon"] <= 8.0 + 1e-6
    assert first["privacy"]["trainings"] == 1 and first["privacy_after"]["trainings"] == 2
    assert 0 <= first["audit"]["auc"] <= 1 and first["audit"]["n_members"] == 36
    assert second["outcome"] == "refused" and "refusing to train" in second["error"]
    ledger = json.loads((out / "privacy" / "ledger.json").read_text())
    assert len(ledger["entries"]) == 2
    # what reached the server says the ε it was trained under (crosslm.json in the bundle)
    metas = [json.loads(p.read_text()) for p in (tmp_path / "server").rglob("crosslm.json")]
    stated = [m["info"]["privacy"]["epsilon"] for m in metas if m.get("info", {}).get("privacy")]
    assert stated and max(stated) <= 8.0 + 1e-6
    uploads = len([p for p in (tmp_path / "server").rglob("crosslm.json")])
    # a restart cannot reset the budget: the first training is refused before anything is sent
    assert main(["run", "--config", str(cfg)]) == 6
    assert len([p for p in (tmp_path / "server").rglob("crosslm.json")]) == uploads
    status = json.loads((out / "status.json").read_text())
    assert status["phase"] == "refused"


@pytest.mark.e2e
def test_daemon_audit_bound_stops_the_upload(tmp_path, server):
    # a family that memorises random records with random labels (tests/fakes/tiny_shared_slm.py)
    cfg = write_silo(tmp_path, server, "silo-leaky", rounds=1, privacy="enabled = false",
                     audit="[audit]\nbefore_upload = true\nmax_auc = 0.6\nbootstrap = 0\n")
    cfg.write_text(cfg.read_text().replace("TINY_SHARED", "OVERFIT").replace('name = "silo-leaky"',
                                                                           'name = "silo-leaky"\nheldout_fraction = 0.5'))
    texts, ys = random_records(160, seed=3)
    (tmp_path / "silo-leaky.jsonl").write_text("\n".join(
        json.dumps({"text": t, "label": ["neg", "pos"][y]}) for t, y in zip(texts, ys)))
    assert main(["run", "--config", str(cfg)]) == 6
    (report,) = _reports(tmp_path / "silo-leaky-out")
    assert report["outcome"] == "refused" and "membership-inference AUC" in report["error"]
    assert report["audit"]["auc"] > 0.6
    assert not list((tmp_path / "server").rglob("crosslm.json"))  # nothing was sent


def test_dp_on_a_family_without_dp_is_a_config_error(tmp_path):
    cfg = tmp_path / "s.toml"
    (tmp_path / "d.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n' * 4)
    cfg.write_text('[silo]\nname = "s"\nlabels = ["neg", "pos"]\ndata = "d.jsonl"\narch = "fakes.tiny_slm:TINY"\n'
                   '[server]\nplaintext_dev_mode = true\n[privacy]\nenabled = true\n')
    assert main(["run", "--config", str(cfg)]) == 2
    cfg.write_text(cfg.read_text().replace("enabled = true", "enabled = true\nepsilon = -1"))
    assert main(["run", "--config", str(cfg)]) == 2
