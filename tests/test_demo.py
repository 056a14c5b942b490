"""`crosslm demo`: a server and four silo daemons as processes over gRPC (mTLS), on tiny random models.

The engine is the real `crosslm` round on a tiny random Llama and a toy task; the silos run the
daemon's `tiny` architecture. The slow test at the end runs `crosslm demo --quick` on the real
offline models.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import write_task
from crosslm_client.config import load_silo_config
from crosslm_server.experiments.demo import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, DemoSettings, prepare
from crosslm_server.experiments.demo_supervisor import run
from crosslm_server.experiments.report import check_schema
from crosslm_server.method.config import SIMULATE_ONLY, load_config, load_engine_config
from crosslm_server.service.config import load_server_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def demo_config(tmp_path, tiny_llm_dir) -> Path:
    task = write_task(tmp_path, labels=("negative", "positive"), n_per_label=120)
    cfg = tmp_path / "demo-tiny.toml"
    cfg.write_text(f'''task = "{task}"
rounds = 2
archs = ["fakes.tiny_slm:TINY"]
[split]
n_silos = 2
n_private = 16
n_test = 10
n_llm_test = 10
n_judge = 0
alpha = 0.5
[llm]
model = "{tiny_llm_dir}"
target_modules = ["q_proj", "v_proj"]
[round.generate]
per_label = 3
batch_size = 6
max_new_tokens = 10
[round.update]
batch_size = 4
[round.filter]
min_words = 1
enabled = false    # a tiny random LLM's texts: a round that kept none would publish no LLM version
[round.slm]
lrs = [1e-3]
max_epochs = 2
[eval]
ppl_max_tokens = 32
''')
    return cfg


def _settings(config: Path, out: Path, **kw) -> DemoSettings:
    return DemoSettings(config=config, out=out, archs=("fakes.tiny_slm:TINY",), llm_eval_texts=6, llm_eval_docs=2, **kw)


@pytest.mark.e2e
def test_demo_runs_four_silos_and_writes_the_report(tmp_path, demo_config):
    out = tmp_path / "run"
    layout = prepare(_settings(demo_config, out))
    assert list(layout.archs) == ["silo-a", "silo-b", "silo-c", "silo-d"]  # --silos 4 replaces split.n_silos
    lines: list[str] = []
    assert run(layout, timeout_s=300, echo=lines.append) == EXIT_OK, "\n".join(lines)
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "demo" and check_schema(report) == []
    assert set(report["silos"]) == set(layout.archs)
    for silo in report["silos"].values():
        assert silo["arch"] == "tiny" and len(silo["acc_after"]) == 2 and 0 <= silo["acc_local"] <= 1
        assert silo["n_test"] == 10 and silo["n_private"] == 16
    llm = report["llm"]
    assert {"acc_before", "acc_after", "ppl_before", "ppl_after"} <= set(llm) and llm["eval_texts"] == 6
    # once per round of the four silos: after every 4th published version (a round that kept no
    # sample publishes none, so the count is read from the rounds, not assumed to be 8)
    versions = max(v["adapter_version"] for r in report["rounds"] for v in r["silos"].values())
    expected = list(range(4, versions + 1, 4))
    assert expected and [e["after_update"] for e in llm["evaluations"]] == expected, versions
    # "after round r" is the first measurement once every round-r update was applied; which
    # that is depends on the order the silos' submissions reached the server
    for r in report["rounds"]:
        last = max(v["adapter_version"] for v in r["silos"].values())
        assert r["llm"]["after_update"] == min([e for e in expected if e >= last] or [expected[-1]])
    assert report["rounds"][-1]["llm"]["after_update"] == expected[-1]
    assert all(len(r["silos"]) == 4 and len(r["silos"]["silo-a"]["reward_hist"]) == 10 for r in report["rounds"])
    assert report["plots"] == ["slm_per_round.png", "llm_per_round.png", "filter_rewards.png"]
    assert all((out / p).stat().st_size > 10_000 for p in report["plots"])
    md = (out / "report.md").read_text()
    assert "silo-only" in md and "How this was measured" in md and "ZeroGen" not in md
    text = "\n".join(lines)
    for name in layout.archs:  # a line per change of each silo (what it shows in between depends on timing)
        assert re.search(rf"{name} \(tiny\)\s+round 2/2: ", text) and re.search(rf"{name} .*finished all rounds", text)
    assert re.search(r"ready: 8/8 rounds done", text) and "report: " in text
    for name in layout.archs:  # every daemon finished, and said so in its status file
        assert json.loads((out / name / "status.json").read_text())["phase"] == "done"


def test_progress_lines_say_which_stage_and_done_of_total():
    from crosslm_server.experiments.demo_progress import describe

    def server(event, **fields):
        return describe({"phase": "server", "round": 1, "rounds": 2, "event": event, "fields": fields})

    assert server("generating", done=48, total=64) == "round 1/2: server: generating synthetic examples 48/64"
    assert server("training_llm", done=3, total=8, loss=0.7) == \
        "round 1/2: server: updating the LLM (LoRA) step 3/8"
    assert server("queued", position=2) == "round 1/2: queued on the server (position 2)"
    assert server("evaluating_llm", texts=100, docs=10) == \
        "round 1/2: server: measuring the LLM (100 zero-shot texts, 10 perplexity documents)"
    assert server("failed", reason="boom").endswith("round FAILED on the server: boom")
    assert describe({"phase": "training", "round": 0, "arch": "mpnet4", "examples": 96}) == \
        "training its mpnet4 SLM on 96 private examples"
    assert describe({"phase": "round done", "round": 2, "rounds": 2, "kept": "enhanced", "test_accuracy": 0.6125}) \
        == "round 2/2: done, kept the enhanced SLM, test accuracy 61.3 %"


def test_the_demo_configs_have_the_examples_shape(tmp_path, demo_config):
    """server.toml and silo-X.toml load like the examples, with the same sections."""
    layout = prepare(_settings(demo_config, tmp_path / "run", silos=2))
    example = tomllib.loads((ROOT / "examples" / "server.toml").read_text())
    ours = tomllib.loads(layout.server_toml.read_text())
    assert set(ours) == set(example) and set(ours["engine"]) == set(example["engine"])
    server = load_server_config(layout.server_toml)
    cfg = load_config(demo_config, ["split.n_silos=2"])
    assert not server.server.plaintext_dev_mode and server.server.tls_ca == tmp_path / "run" / "certs" / "ca.pem"
    assert server.engine.name == "crosslm" and Path(server.engine.options["eval_data"]).is_file()
    for name in ("silo-a", "silo-b"):
        silo = load_silo_config(layout.silo_toml(name))
        assert set(tomllib.loads(layout.silo_toml(name).read_text())) == \
            set(tomllib.loads((ROOT / "examples" / f"{name}.toml").read_text()))
        assert silo.silo.data.is_file() and silo.silo.test_data.is_file() and silo.server.cert.is_file()
        assert silo.server.address == f"127.0.0.1:{layout.grpc_port}"
        # the silo trains as the engine config's [round.slm] says, every setting of it
        assert silo.train.slm_config(seed=cfg.seed) == replace(cfg.round.slm, seed=cfg.seed)
    # the server's round settings: the config's, in a file that holds nothing the server ignores
    engine = load_engine_config(server.engine.options["config"])
    assert (engine.llm, engine.round, engine.eval) == (cfg.llm, cfg.round, cfg.eval)
    assert not set(tomllib.loads(Path(server.engine.options["config"]).read_text())) & set(SIMULATE_ONLY)
    with pytest.raises(Exception, match="not empty"):
        prepare(_settings(demo_config, tmp_path / "run"))


def test_the_demo_hands_its_privacy_table_to_every_silo(tmp_path, demo_config):
    """`crosslm demo --set privacy.enabled=true ...`: every silo TOML it writes carries [privacy],
    and a demo without DP writes none."""
    sets = ("zerogen=false", "privacy.enabled=true", "privacy.epsilon=8.0", "privacy.rounds=2")
    layout = prepare(_settings(demo_config, tmp_path / "dp", silos=2, sets=sets))
    for name in ("silo-a", "silo-b"):
        p = load_silo_config(layout.silo_toml(name)).privacy
        assert (p.enabled, p.epsilon, p.rounds) == (True, 8.0, 2)
    plain = prepare(_settings(demo_config, tmp_path / "plain", silos=2))
    assert "privacy" not in tomllib.loads(plain.silo_toml("silo-a").read_text())


@pytest.mark.e2e
def test_a_crashing_silo_is_named_with_its_log_and_everything_stops(tmp_path, demo_config):
    out = tmp_path / "run"
    layout = prepare(_settings(demo_config, out))
    (out / "data" / "silo-c.csv").write_text("text,label\nfine film,not-a-label\n")
    lines: list[str] = []
    started = time.monotonic()
    assert run(layout, timeout_s=300, echo=lines.append) == EXIT_FAILED
    text = "\n".join(lines)
    assert "FAILED: silo-c exited with code 2 (bad config or data)" in text
    assert "not-a-label" in text  # the tail of silo-c's log says what is wrong
    assert time.monotonic() - started < 120
    pids = [int(p) for p in re.findall(r"started \S+ \(pid (\d+)\)", text)]
    assert len(pids) == 5 and not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.e2e
def test_ctrl_c_stops_every_child(tmp_path, demo_config):
    proc = subprocess.Popen([sys.executable, "-m", "crosslm_server.experiments.cli", "demo", "--config", str(demo_config),
                             "--archs", "fakes.tiny_slm:TINY", "--out", str(tmp_path / "run"), "--llm-eval-texts", "6",
                             "--timeout", "300"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        running: set[str] = set()
        for line in proc.stdout:  # until every daemon reports (under load the last starts seconds late)
            lines.append(line)
            running.update(re.findall(r"\] (silo-\S+) \(tiny\)", line))
            if len(running) == 4:
                break
        proc.send_signal(signal.SIGINT)
        lines += proc.stdout.readlines()
        assert proc.wait(60) == EXIT_INTERRUPTED, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines)
    assert "stopping every process (Ctrl-C)" in text
    pids = [int(p) for p in re.findall(r"started \S+ \(pid (\d+)\)", text)]
    assert len(pids) == 5 and not any(_alive(pid) for pid in pids)
    assert "stopped" in (tmp_path / "run" / "logs" / "silo-a.log").read_text()  # the daemon's clean exit (130)


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.skipif(not os.environ.get("CROSSLM_DEMO_E2E"),
                    reason="the real-model demo takes 4.6 min on 2 idle cores (25-44 min measured under load), "
                           "too much for CI's 20 minutes: CROSSLM_DEMO_E2E=1 runs it")
def test_demo_quick_on_the_real_models(tmp_path):
    """`crosslm demo --quick`: four silos, MiniLM and MPNet-4L, the real SmolLM2; ≤ 4 minutes idle."""
    out = tmp_path / "quick"
    # ≤ 4 minutes on 2 idle cores; 25 minutes measured at nice 10 beside two busy jobs: a generous ceiling
    proc = subprocess.run([sys.executable, "-m", "crosslm_server.experiments.cli", "demo", "--quick", "--out", str(out),
                           "--timeout", "3300"], capture_output=True, text=True, timeout=3600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert check_schema(report) == [] and len(report["silos"]) == 4
    assert {s["arch"] for s in report["silos"].values()} == {"minilm", "mpnet4"}
    assert report["llm"]["ppl_before"] > 1 and len(report["plots"]) >= 2
    assert "report.md" in proc.stdout


@pytest.mark.e2e
def test_a_server_whose_llm_cannot_load_fails_the_demo_with_the_reason(tmp_path, demo_config):
    demo_config.write_text(re.sub(r'model = "[^"]*"', 'model = "/no/such/llm"', demo_config.read_text()))
    lines: list[str] = []
    assert run(prepare(_settings(demo_config, tmp_path / "run", silos=2)), timeout_s=300,
               echo=lines.append) == EXIT_FAILED
    text = "\n".join(lines)
    assert "FAILED: the server cannot run rounds: engine failed to load" in text and "/no/such/llm" in text


@pytest.mark.parametrize("demo", ["demo.toml", "demo-quick.toml"])
def test_the_demos_differ_from_the_study_settings_only_in_counts(demo):
    """examples/demo.toml and demo-quick.toml are examples/rt-4silo.toml with smaller counts, nothing else."""
    from crosslm_server.method.config import as_dict, load_config

    counts = {("split", "n_private"), ("split", "n_test"), ("split", "n_llm_test"), ("split", "n_judge"),
              ("round.generate", "per_label"), ("round.generate", "batch_size"), ("round.generate", "max_new_tokens"),
              ("round.slm", "lrs"), ("round.slm", "max_epochs"), ("eval", "n_ppl_docs"), ("eval", "ppl_max_tokens"),
              ("eval", "judge_per_label")}

    def flat(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}.{key}" if prefix else key)
            else:
                yield (prefix, key), value

    quick = dict(flat(as_dict(load_config(ROOT / "examples" / demo))))
    full = dict(flat(as_dict(load_config(ROOT / "examples" / "rt-4silo.toml"))))
    assert {k: v for k, v in quick.items() if k not in counts} == {k: v for k, v in full.items() if k not in counts}
