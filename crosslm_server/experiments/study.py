"""`crosslm study`: every arm over several seeds on the same splits, resumable, with intervals.

Arms: silo-only and ZeroGen (the baselines every simulate run carries), CrossLM and its
ablations (config overrides of the CrossLM arm). Each (arm, seed) is one simulate run in
``DIR/runs/<arm>/seed-<n>/``; a finished run is never redone, so a study cut off continues with
what it has not finished. Baselines are shared across arms through the artefact cache.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from crosslm_server.experiments.arms import ABLATIONS, zerogen_of
from crosslm_server.experiments.study_summary import headline, load_run, render, summarise
from crosslm_server.method.config import load_config
from crosslm_shared.atomic import write_text_atomic
from crosslm_shared.errors import ConfigError

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows has no fcntl: there each study process runs every missing pair itself
    fcntl = None

def run_study(config: str | None, out: Path, *, seeds: list[int], arms: list[str], overrides: list[str] = (),
              cache_dir: Path | None = None, run: bool = True) -> dict:
    """Run the missing (arm, seed) pairs into ``out/runs`` and summarise. ``cache_dir`` (default
    ``out/cache``) holds the baselines; another study of the same task and splits can share it.
    ``run=False`` only summarises what has finished (e.g. while another process runs the rest)."""
    unknown = set(arms) - set(ABLATIONS)
    if unknown:
        raise ConfigError(f"unknown arm(s) {sorted(unknown)}; choose from {sorted(ABLATIONS)}")
    if "crosslm" not in arms:
        arms = ["crosslm", *arms]
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds if run else ():
        for arm in arms:
            run_dir = out / "runs" / arm / f"seed-{seed}"
            cfg = load_config(config, [*overrides, *ABLATIONS[arm], f"seed={seed}",
                                       f"zerogen={'true' if zerogen_of(arm) else 'false'}"])
            with _run_lock(run_dir) as holder:
                if holder is not None:
                    log.info("study: %s seed %d is running in another process (%s), skipping", arm, seed, holder)
                    continue
                _run_pair(out, arm, seed, cfg, run_dir, cache_dir or out / "cache")
    summary = summarise(out, seeds=seeds, arms=arms)
    summary["task"] = load_config(config, list(overrides)).task
    summary["headline"] = headline(summary)
    # atomic: several processes may share this study (_run_lock), each summarising when it ends
    write_text_atomic(out / "study.json", json.dumps(summary, indent=2))
    write_text_atomic(out / "study.md", render(summary))
    try:
        from crosslm_server.experiments.plots import study_plots

        summary["plots"] = study_plots(summary, out)
    except ImportError as e:  # matplotlib is a dependency; a broken install must not lose the numbers
        log.warning("plots skipped: %s", e)
    return summary


def _run_pair(out: Path, arm: str, seed: int, cfg, run_dir: Path, cache_dir: Path) -> None:
    """Run one (arm, seed) unless it has finished (then only check it ran this configuration)."""
    from crosslm_server.experiments.report import write_report
    from crosslm_server.experiments.simulate import simulate

    rep = load_run(out, arm, seed)  # read under the lock: another process may have just finished it
    if rep is not None:
        _check_same_config(rep, cfg, run_dir)
    if rep is not None and (not cfg.zerogen or "zerogen" in rep["baselines"]):
        log.info("study: %s seed %d already done, skipping", arm, seed)
    elif rep is not None:  # finished before the arm had its own ZeroGen: add only that
        log.info("study: %s seed %d: adding its own ZeroGen baseline", arm, seed)
        base = simulate(cfg, run_dir, cache_dir=cache_dir, baselines_only=True)
        rep["baselines"]["zerogen"] = base["baselines"]["zerogen"]
        rep["timing"]["zerogen_s"] = base["timing"]["zerogen_s"]
        write_report(rep, run_dir)
    else:
        log.info("study: running %s seed %d -> %s", arm, seed, run_dir)
        simulate(cfg, run_dir, cache_dir=cache_dir)


@contextmanager
def _run_lock(run_dir: Path) -> Iterator[str | None]:
    """Hold ``run_dir`` for this process while it runs, so several ``crosslm study`` processes on
    one ``--out`` (one per core) share the missing runs out instead of all running the first.
    Yields None when held, or who holds it. An OS lock (flock): a killed process leaves no stale
    claim behind, and the file (``seed-<n>.study-lock`` beside the run) goes once the run ends."""
    if fcntl is None:
        yield None
        return
    path = run_dir.with_name(f"{run_dir.name}.study-lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            yield f.read().strip() or "another process"
            return
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield None
        finally:
            path.unlink(missing_ok=True)


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat |= _flatten(v, f"{prefix}{k}.")
        else:
            flat[f"{prefix}{k}"] = v
    return flat


# keys a finished run may differ in: whether it ran its own ZeroGen (added later, baselines only)
_RESUMABLE_KEYS = {"zerogen"}


def _check_same_config(rep: dict, cfg, run_dir: Path) -> None:
    """A finished run is reused only if it ran the configuration the study would run now: after a
    default or the config file changes, old runs must not pass for the new protocol. Options the
    run's report lacks were added since with defaults that keep the old behaviour, and pass."""
    from crosslm_server.method.config import as_dict

    old, new = _flatten(rep["config"]), _flatten(json.loads(json.dumps(as_dict(cfg), default=str)))
    diff = {k: (old[k], new[k]) for k in old.keys() & new.keys() - _RESUMABLE_KEYS if old[k] != new[k]}
    if diff:
        shown = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in sorted(diff.items()))
        raise ConfigError(f"{run_dir} finished with a different configuration ({shown}); study into a new "
                          f"--out, or move that run away to rerun it")
