"""End to end over the wire: a tiny server and the silo daemon run a round; privacy canary."""
import json
import random

import pytest

from crosslm_client.cli import main
from service_helpers import address, server_config, start_server

CANARY = "zqxcanary7731"
POS = ["good film", "great fun movie", "i love it", "the best story", "really nice plot", "very funny"]
NEG = ["bad film", "boring dull movie", "i hate it", "the worst story", "awful weak plot", "very poor"]


def write_silo(tmp_path, server, name, *, rounds=1):
    rng = random.Random(name)
    rows = [{"text": f"{rng.choice(POS)} {CANARY}", "label": "pos"} for _ in range(16)]
    rows += [{"text": f"{rng.choice(NEG)} {CANARY}", "label": "neg"} for _ in range(16)]
    data = tmp_path / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f'output_dir = "{name}-out"\n[silo]\nname = "{name}"\ntask = "rt"\nlabels = ["neg", "pos"]\n'
                   f'data = "{data.name}"\narch = "fakes.tiny_slm:TINY"\nseed = 1\n[server]\naddress = "{address(server)}"\n'
                   f'max_attempts = 3\nbackoff_initial_s = 0.05\nplaintext_dev_mode = true\n[train]\nmax_epochs = 2\nlrs = [0.001]\n'
                   f'[rounds]\ncount = {rounds}\n')
    return cfg


@pytest.mark.e2e
@pytest.mark.privacy
def test_daemon_runs_rounds_and_no_private_text_leaves(tmp_path):
    server = start_server(server_config(tmp_path / "server"))
    try:
        cfg = write_silo(tmp_path, server, "silo-a", rounds=2)
        assert main(["run", "--config", str(cfg)]) == 0
        reports = sorted((tmp_path / "silo-a-out" / "reports").glob("round-*.json"))
        assert len(reports) == 2
        for path in reports:
            report = json.loads(path.read_text())
            assert report["outcome"] == "ready" and report["kept"] in ("enhanced", "previous")
            assert report["events"][-1]["kind"] == "ready"
            assert report["accuracy_after"] >= report["accuracy_before"]
        # privacy: nothing the server received or stored contains the private texts
        for f in (tmp_path / "server").rglob("*"):
            if f.is_file():
                assert CANARY.encode() not in f.read_bytes(), f"canary leaked into {f}"
    finally:
        server.stop(grace=1)


@pytest.mark.e2e
def test_daemon_reports_public_test_accuracy_and_its_status(tmp_path):
    """With [silo] test_data: the kept model's accuracy on it before and after each round; status.json."""
    server = start_server(server_config(tmp_path / "server"))
    try:
        cfg = write_silo(tmp_path, server, "silo-t", rounds=2)
        test = tmp_path / "public-test.csv"
        test.write_text("text,label\n" + "".join(f"{p},pos\n{n},neg\n" for p, n in zip(POS, NEG)))
        cfg.write_text(cfg.read_text().replace("seed = 1\n", f'seed = 1\ntest_data = "{test.name}"\n'))
        assert main(["run", "--config", str(cfg)]) == 0
        first, second = (json.loads(p.read_text()) for p in
                         sorted((tmp_path / "silo-t-out" / "reports").glob("round-*.json")))
        assert first["test_examples"] == 12 and first["arch"] == "tiny" and first["n_train"] + first["n_heldout"] == 32
        assert first["label_counts"] == {"neg": 16, "pos": 16}
        assert 0 <= first["test_accuracy_before"] <= 1 and second["test_accuracy_before"] == first["test_accuracy_after"]
        if second["kept"] == "previous":
            assert second["test_accuracy_after"] == second["test_accuracy_before"]
        status = json.loads((tmp_path / "silo-t-out" / "status.json").read_text())
        assert (status["phase"], status["round"], status["rounds"], status["silo"]) == ("done", 2, 2, "silo-t")
    finally:
        server.stop(grace=1)


@pytest.mark.e2e
def test_daemon_exit_codes(tmp_path):
    server = start_server(server_config(tmp_path / "server"))
    try:
        cfg = write_silo(tmp_path, server, "silo-b")
        (tmp_path / "silo-b.jsonl").write_text('{"text": "x", "label": "nope"}\n')
        assert main(["run", "--config", str(cfg)]) == 2
    finally:
        server.stop(grace=1)
    cfg = write_silo(tmp_path, server, "silo-c")
    assert main(["run", "--config", str(cfg), "--server", "127.0.0.1:1"]) == 4


def _minilm_available() -> bool:
    try:
        from crosslm_shared import assets

        assets.minilm_dir()
        return True
    except Exception:  # noqa: BLE001 - any failure means the package is not usable here
        return False


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.skipif(not _minilm_available(), reason="needs the offline MiniLM package (scripts/bootstrap)")
def test_a_real_minilm_bundle_makes_the_round_trip(tmp_path):
    """The real SLM's save_pretrained folder passes bundle validation and comes back loadable."""
    server = start_server(server_config(tmp_path / "server", engine_options={"steps": 1}))
    try:
        cfg = write_silo(tmp_path, server, "silo-m")
        text = cfg.read_text().replace('arch = "fakes.tiny_slm:TINY"', 'arch = "minilm"').replace("epochs = 2", "epochs = 1")
        cfg.write_text(text.replace("[rounds]", "continue_epochs = 0\n[rounds]"))
        assert main(["run", "--config", str(cfg)]) == 0
        report = json.loads((tmp_path / "silo-m-out" / "reports" / "round-001.json").read_text())
        assert report["outcome"] == "ready" and report["bundle_bytes"] > 80_000_000
    finally:
        server.stop(grace=1)


def test_the_daemon_answers_sigterm_before_it_imports_torch():
    """The SIGTERM handler goes in before torch loads: a daemon stopped as it starts exits 130, logged."""
    import subprocess
    import sys

    code = "import sys, crosslm_client.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
