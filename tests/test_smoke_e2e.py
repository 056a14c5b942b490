"""The real offline models end to end: `crosslm simulate --config examples/smoke.toml`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from crosslm_server.experiments.report import check_schema

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.e2e
def test_smoke_config_runs_on_real_models(tmp_path):
    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, "-m", "crosslm_server.experiments.cli", "simulate", "--config",
                           str(ROOT / "examples" / "smoke.toml"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert check_schema(report) == []
    assert report["llm"]["ppl_before"] > 1
    assert "report.md" in proc.stdout
