"""The silo daemon (DESIGN.md §5): train, bundle, upload, watch, download, evaluate, keep the better.

Only the SLM's weights, config and tokenizer files leave the silo (the bundle allow-list);
the private texts never do. One JSON report per round goes to <output_dir>/reports/, and
<output_dir>/status.json always says what the daemon is doing now (phase, round, the server's
latest event), for operators and `crosslm demo`. With `[silo] test_data`, the kept model's
accuracy on those public test examples is reported before and after each round; they are
never trained on and never used to choose a model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crosslm_client import models, privacy
from crosslm_client.config import SiloConfig
from crosslm_client.models import Examples
from crosslm_client.transport import CrossLMClient, RetryPolicy, TlsFiles
from crosslm_shared.atomic import write_text_atomic
from crosslm_shared.bundle import SYNTHETIC_FILE, Manifest, make_manifest, read_synthetic, validate_bundle_dir
from crosslm_shared.convert import manifest_to_json
from crosslm_shared.data import heldout_split, read_labelled
from crosslm_shared.schema import as_table
from crosslm_shared.errors import DataError, PrivacyError
from crosslm_shared.records import Stage

log = logging.getLogger(__name__)


@dataclass
class SiloState:
    model_dir: Path
    accuracy: float
    temperature: float
    test_accuracy: float | None = None  # on [silo] test_data, when given


class Status:
    """``<output_dir>/status.json``, rewritten atomically at every change of phase or server event."""

    def __init__(self, path: Path, *, silo: str, rounds: int):
        self.path, self.base = path, {"silo": silo, "rounds": rounds, "pid": os.getpid()}
        self.round = 0

    def __call__(self, phase: str, round_no: int, **detail: Any) -> None:
        self.round = round_no
        state = {**self.base, "phase": phase, "round": round_no, "time": time.time(), **detail}
        write_text_atomic(self.path, json.dumps(state, default=str))


def upload_id_for(silo: str, round_no: int, manifest: Manifest) -> str:
    """Deterministic: a restarted daemon resumes the same upload instead of starting over."""
    digest = hashlib.sha256(manifest_to_json(manifest).encode()).hexdigest()[:16]
    return f"{silo}-r{round_no}-{digest}"


def connect(config: SiloConfig, *, retry: RetryPolicy | None = None) -> CrossLMClient:
    """A client as the config says: mTLS with the silo's certificate, or plaintext dev mode."""
    c = config.server
    tls = None if c.plaintext_dev_mode else TlsFiles(ca=c.ca, cert=c.cert, key=c.key, server_name=c.server_name)
    retry = retry or RetryPolicy(initial_s=c.backoff_initial_s, max_s=c.backoff_max_s, max_attempts=c.max_attempts)
    return CrossLMClient(c.address, config.silo.name, chunk_size=c.chunk_size, retry=retry,
                         idle_timeout_s=c.idle_timeout_s, tls=tls)


def run(config: SiloConfig) -> list[dict[str, Any]]:
    (config.output_dir / "reports").mkdir(parents=True, exist_ok=True)
    status = Status(config.output_dir / "status.json", silo=config.silo.name, rounds=config.rounds.count)
    try:
        return _run(config, status)
    except PrivacyError as e:  # the policy stopped a training or an upload: the round's report says why
        report = {"round": status.round, "silo": config.silo.name, "task": config.silo.task, "outcome": "refused",
                  "error": str(e), "kept": "previous", **e.report}
        (config.output_dir / "reports" / f"round-{status.round:03d}.json").write_text(json.dumps(report, indent=2))
        status("refused", status.round, error=str(e))
        raise


def _run(config: SiloConfig, status: Status) -> list[dict[str, Any]]:
    s = config.silo
    out = config.output_dir
    status("loading data", 0)
    examples, train, held = private_split(config)
    test = _load_test(config)
    log.info("silo %s: %d training and %d held-out examples from %s", s.name, len(train[0]), len(held[0]), s.data)
    reports = []
    budget = privacy.open_budget(config, models.family(config), n_records=len(train[0]))
    with connect(config) as client:  # reads the TLS files first: a wrong path fails before any training
        status("training", 0, arch=models.family(config).name, examples=len(train[0]))
        state = _initial_model(config, train, held, test, budget)
        round_no = 1
        while config.rounds.count == 0 or round_no <= config.rounds.count:
            report, state = run_round(config, client, state, round_no, train, held, test=test, status=status,
                                      budget=budget)
            report |= {"arch": models.family(config).name, "n_train": len(train[0]), "n_heldout": len(held[0]),
                       "label_counts": _label_counts(s.labels, examples.labels),
                       "train": as_table(config.train)}
            (out / "reports" / f"round-{round_no:03d}.json").write_text(json.dumps(report, indent=2))
            reports.append(report)
            status("round done", round_no, outcome=report["outcome"], kept=report["kept"],
                   test_accuracy=report.get("test_accuracy_after"))
            round_no += 1
            if config.rounds.count == 0 or round_no <= config.rounds.count:
                time.sleep(config.rounds.interval_s)
    status("done", round_no - 1)
    return reports


def private_split(config: SiloConfig):
    """The silo's private records and their (train, held-out) cut, the same every run: what the
    daemon trains and selects on, and what the audit calls members and non-members."""
    s = config.silo
    examples = read_labelled(s.data, labels=s.labels, text_column=s.text_column, label_column=s.label_column)
    train, held = (part.pair() for part in heldout_split(examples, fraction=s.heldout_fraction, seed=s.seed))
    return examples, train, held


def _load_test(config: SiloConfig) -> Examples | None:
    s = config.silo
    if s.test_data is None:
        return None
    try:
        return read_labelled(s.test_data, labels=s.labels, text_column=s.text_column,
                             label_column=s.label_column).pair()
    except DataError as e:
        raise DataError(f"[silo] test_data: {e}") from e


def _label_counts(labels, ys) -> dict[str, int]:
    counts = Counter(ys)
    return {name: counts[i] for i, name in enumerate(labels)}


def _initial_model(config: SiloConfig, train: Examples, held: Examples, test: Examples | None,
                   budget=None) -> SiloState:
    folder = config.output_dir / "models" / "round-000"
    family = models.family(config)
    dp = {"privacy": budget} if budget is not None else {}  # a family without DP support never sees the keyword
    model = family.train_new(config, train, held, work_dir=config.output_dir / "work", **dp)
    temperature = family.calibrate(config, model, held)
    accuracy = model.evaluate(*held)
    test_accuracy = model.evaluate(*test) if test else None
    _save(model, folder)
    log.info("silo %s: trained %s SLM, held-out accuracy %.4f, temperature %.3f%s", config.silo.name,
             family.name, accuracy, temperature, _test_note(test_accuracy, test))
    return SiloState(folder, accuracy, temperature, test_accuracy)


def _test_note(accuracy: float | None, test: Examples | None) -> str:
    return "" if accuracy is None else f", test accuracy {accuracy:.4f} on {len(test[0])} public examples"


def _save(model: Any, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _quiet(phase: str, round_no: int, **detail: Any) -> None:
    pass


def run_round(config: SiloConfig, client: CrossLMClient, state: SiloState, round_no: int,
              train: Examples, held: Examples, *, test: Examples | None = None,
              status=_quiet, budget=None) -> tuple[dict[str, Any], SiloState]:
    s = config.silo
    started = time.monotonic()
    family = models.family(config)
    manifest = make_manifest(state.model_dir, task=s.task, silo=s.name, arch=family.name, labels=s.labels,
                             temperature=state.temperature, heldout_accuracy=state.accuracy)
    upload_id = upload_id_for(s.name, round_no, manifest)
    report: dict[str, Any] = {"round": round_no, "silo": s.name, "task": s.task, "upload_id": upload_id,
                              "accuracy_before": state.accuracy, "bundle_bytes": manifest.total_size}
    if state.test_accuracy is not None:
        report.update(test_accuracy_before=state.test_accuracy, test_examples=len(test[0]))
    status("checking privacy", round_no)
    report.update(privacy.before_upload(config, family, state.model_dir, train, held, budget))
    status("uploading", round_no, bytes=manifest.total_size)
    t0 = time.monotonic()
    client.upload(state.model_dir, manifest, upload_id)
    report["upload_seconds"] = round(time.monotonic() - t0, 3)
    sub = client.submit(upload_id)
    report["submission_id"] = sub.submission_id
    log.info("silo %s: round %d submitted as %s", s.name, round_no, sub.submission_id)
    status("submitted", round_no, submission=sub.submission_id)
    events = []
    for event in client.watch(sub.submission_id):
        events.append({"seq": event.seq, "kind": event.kind, **event.fields})
        log.info("silo %s: submission %s: %s %s", s.name, sub.submission_id, event.kind, dict(event.fields))
        status("server", round_no, submission=sub.submission_id, event=event.kind, fields=dict(event.fields))
    report["events"] = events
    done = client.get_submission(sub.submission_id)
    report["server_metrics"] = dict(done.metrics)
    if done.stage != Stage.READY or done.result is None:
        report.update(outcome=Stage.FAILED, error=done.error, kept="previous", accuracy_after=state.accuracy,
                      seconds=round(time.monotonic() - started, 3))
        if state.test_accuracy is not None:
            report["test_accuracy_after"] = state.test_accuracy
        log.warning("silo %s: round %d failed on the server: %s", s.name, round_no, done.error)
        return report, state
    dest = config.output_dir / "downloads" / sub.submission_id
    status("downloading", round_no, bytes=done.result.total_size)
    t0 = time.monotonic()
    client.download(sub.submission_id, done.result, dest)
    report["download_seconds"] = round(time.monotonic() - t0, 3)
    validate_bundle_dir(dest, done.result)
    synthetic = None
    if (dest / SYNTHETIC_FILE).exists():
        texts, targets = read_synthetic(dest / SYNTHETIC_FILE, len(s.labels))
        synthetic = (texts, np.asarray(targets).reshape(-1, len(s.labels)))
        report["synthetic_examples"] = len(texts)
    status("continuing", round_no, epochs=config.train.continue_epochs,
           synthetic=len(synthetic[0]) if synthetic else 0)
    current = family.load(config, state.model_dir)
    dp = {"privacy": budget} if budget is not None else {}
    chosen, info = family.continue_and_choose(config, current, family.load(config, dest), train, held, synthetic, **dp)
    adopted = bool(info["adopted"])
    report.update(outcome=Stage.READY, selection={k: info[k] for k in ("val_acc_current", "val_acc_returned")},
                  kept="enhanced" if adopted else "previous")
    if adopted:
        status("evaluating", round_no)
        temperature = chosen.temperature  # the family calibrated it when it chose
        accuracy = chosen.evaluate(*held)
        report["accuracy_enhanced"] = accuracy
        folder = config.output_dir / "models" / f"round-{round_no:03d}"
        _save(chosen, folder)
        state = SiloState(folder, accuracy, temperature, chosen.evaluate(*test) if test else None)
    report.update(accuracy_after=state.accuracy, seconds=round(time.monotonic() - started, 3))
    if budget is not None:
        report["privacy_after"] = budget.summary()  # ε spent including this round's continuation
    if state.test_accuracy is not None:
        report["test_accuracy_after"] = state.test_accuracy
    log.info("silo %s: round %d: held-out %.4f -> %.4f (kept %s; selection %.4f vs %.4f)%s", s.name, round_no,
             report["accuracy_before"], state.accuracy, report["kept"], info["val_acc_returned"],
             info["val_acc_current"], _test_note(state.test_accuracy, test))
    return report, state
