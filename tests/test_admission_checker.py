"""The content check runs apart from the server, bounded in time and memory (issue 24).

Real child processes; the misbehaving checks are in tests/admission_checks.py.
"""
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import admission_checks
from crosslm_server.engines.admission import IsolatedChecker, check_slm
from crosslm_server.service.config import ServerSection
from crosslm_shared.bundle import make_manifest
from crosslm_shared.errors import BundleError, ConfigError
from service_helpers import LABELS, tiny_bundle

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("good"))


def test_a_good_slm_passes_in_a_child_process_that_is_reused(good):
    checker = IsolatedChecker(timeout_s=120, memory_bytes=1024 * MiB)
    try:
        assert checker(check_slm, *good)["parameters"] > 0
        pid = checker._proc.pid
        assert pid != os.getpid()
        assert checker(check_slm, *good)["parameters"] > 0
        assert checker._proc.pid == pid  # one child for all checks while it stays healthy
    finally:
        checker.close()
    assert checker._proc is None


@pytest.mark.parametrize("misbehaviour", ["greedy", "crash"])
def test_a_check_that_runs_out_of_memory_or_dies_is_a_refusal_and_the_next_gets_a_fresh_child(good, misbehaviour):
    checker = IsolatedChecker(timeout_s=120, memory_bytes=256 * MiB)
    try:
        with pytest.raises(BundleError, match="admission_memory_bytes=268435456"):
            checker(getattr(admission_checks, misbehaviour), *good)
        assert checker._proc is None  # replaced before the next check
        assert checker(check_slm, *good)["parameters"] > 0
    finally:
        checker.close()


def test_an_slm_too_big_for_the_memory_bound_is_refused_naming_the_bound(tmp_path, good):
    folder, _ = tiny_bundle(tmp_path)
    weights = load_file(folder / "model.safetensors")
    weights["classifier.ballast"] = torch.zeros(96 * MiB // 4)  # 384 MB of zeros: a 384 MB mapping
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    manifest = make_manifest(folder, task="rt", silo="a", arch="tiny", labels=LABELS, temperature=1.0,
                             heldout_accuracy=0.5)
    checker = IsolatedChecker(timeout_s=120, memory_bytes=256 * MiB)
    try:
        with pytest.raises(BundleError, match="admission_memory_bytes"):
            checker(check_slm, folder, manifest)
        assert checker(check_slm, *good)["parameters"] > 0  # the bound, not the checker, refused it
    finally:
        checker.close()


def test_a_check_past_the_deadline_is_a_refusal_and_the_child_is_killed(good):
    checker = IsolatedChecker(timeout_s=20, memory_bytes=1024 * MiB)
    try:
        checker(check_slm, *good)  # started and warm
        pid = checker._proc.pid
        checker.timeout_s = 1.0
        started = time.monotonic()
        with pytest.raises(BundleError, match="admission_timeout_s=1"):
            checker(admission_checks.slow, *good)
        assert time.monotonic() - started < 10
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone, not left sleeping
        checker.timeout_s = 120
        assert checker(check_slm, *good)["parameters"] > 0
    finally:
        checker.close()


@pytest.mark.parametrize("key,value", [("admission_timeout_s", 0), ("admission_memory_bytes", 1024)])
def test_the_bounds_are_checked_at_load(key, value):
    with pytest.raises(ConfigError, match=key):
        ServerSection(**{key: value})
