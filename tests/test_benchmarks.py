"""The benchmark scripts parse their arguments, and the cheap ones run on tiny sizes and end
with their JSON line. No timing is asserted: the figures belong to docs/performance.md."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = ("transfer", "generation", "llm_passes", "responsiveness", "concurrency", "round", "truncation", "privacy",
           "scaleout")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def bench_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_has_quick_out_and_a_doc(name):
    args = load(name).parse_args(["--quick", "--out", "x.json"])
    assert args.quick and args.out == Path("x.json")
    assert load(name).__doc__.strip()


def test_quick_defaults_are_the_small_ones():
    assert load("transfer").parse_args(["--quick"]).sizes == [64, 256]
    assert load("transfer").parse_args([]).sizes == [64, 1024]
    assert load("concurrency").parse_args(["--quick"]).silos == [1, 4, 16, 32]
    assert load("responsiveness").parse_args(["--quick"]).busy_s == 60.0
    assert load("responsiveness").parse_args([]).busy_s is None


def test_common_helpers():
    import _common
    assert _common.percentile([5, 1, 3, 2, 4], 50) == 3
    assert _common.percentile(list(range(1, 101)), 99) == 99
    assert _common.ratio(1, 4) == 0.25
    with _common.Measure() as m:
        block = bytearray(16 * _common.MiB)  # touched: RSS rises
        block[::4096] = b"x" * len(block[::4096])
    assert m.s >= 0 and m.rss_mib[os.getpid()] >= 0
    assert _common.server_keys(["worker_nice=0", "grace_s=1.5"]) == {"worker_nice": 0, "grace_s": 1.5}


def last_json(args: list[str], tmp_path: Path) -> dict:
    out = subprocess.run([sys.executable, *args, "--workdir", str(tmp_path / "work")], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_transfer_on_a_few_mib_prints_its_figures(tmp_path):
    figures = last_json([str(BENCH / "transfer.py"), "--sizes", "1,2", "--repeats", "1"], tmp_path)
    assert {"upload_vs_raw", "download_vs_raw", "vs_single_message", "rss_growth_mib", "mtls_vs_plain",
            "goals_met", "machine"} <= set(figures)
    assert set(figures["by_size"]) == {"1", "2"}


def test_concurrency_on_a_few_mib_prints_its_figures(tmp_path):
    figures = last_json([str(BENCH / "concurrency.py"), "--silos", "1,3", "--total-mib", "3", "--repeats", "1"],
                        tmp_path)
    assert figures["failures"] == 0
    assert {"vs_one_stream", "vs_one_stream_at_3", "levels", "machine"} <= set(figures)
