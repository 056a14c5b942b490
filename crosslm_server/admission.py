"""Peer admission: the content check an uploaded SLM passes before it may score anyone's round.

`validate_bundle_dir` (shared/bundle.py) checks the files without loading them. This module
loads the SLM the way the engines do (transformers' safetensors loader, on CPU) and checks
what they need from it: the task is served and its labels are the task's, every tensor the
architecture has is in the file and no other (a missing tensor would be re-initialised at
random), every weight is finite, and the calibrated outputs on a few fixed probe texts are
finite probabilities. One check runs at a time (`_ONE_AT_A_TIME`), so the memory it takes is
at most one bundle, whatever the number of silos uploading.

The rule (docs/service.md, "Peer admission"): an SLM scores other silos' rounds only after it
passed this check at upload *and* its own round succeeded (`Store.finish` makes it the silo's
peer; a failed round never does).
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from crosslm_shared.bundle import META_FILE, Manifest, check_temperature
from crosslm_shared.errors import BundleError

log = logging.getLogger(__name__)
PROBE_TEXTS = ("a good film", "a bad film", "call now to win a prize", "what is the capital of france",
               "the", "")
_ONE_AT_A_TIME = threading.Lock()

TaskLabels = Callable[[str], "tuple[str, ...] | None"]


def check_task(manifest: Manifest, task_labels: TaskLabels | None) -> None:
    """The manifest's task is served here and its labels are the task's, in order.

    `task_labels(task)` gives the served task's labels or None for an unknown task; without it
    (an engine that does not say) every task is taken.
    """
    if task_labels is None:
        return
    want = task_labels(manifest.task)
    if want is None:
        raise BundleError(f"task {manifest.task!r} is not served by this server; ask its operator which "
                          "tasks it serves")
    if tuple(want) != tuple(manifest.labels):
        raise BundleError(f"manifest.labels {list(manifest.labels)} are not task {manifest.task!r}'s labels "
                          f"{list(want)} (same names, same order): train the SLM on the task's labels")


def check_slm(folder: Path, manifest: Manifest) -> Mapping[str, int]:
    """Load the SLM in `folder` on CPU and raise BundleError unless an engine can use it as a scorer.

    Returns a few figures for the log (tensors, parameters). The reasons name the problem and
    never a server path.
    """
    with _ONE_AT_A_TIME:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        temperature = check_temperature(meta.get("temperature", manifest.temperature), f"{META_FILE} temperature")
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                folder, use_safetensors=True, output_loading_info=True, device_map=None)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # noqa: BLE001 - whatever the loader says, the bundle is unusable
            log.info("content check of a bundle from silo %s failed to load: %s: %s", manifest.silo,
                     type(e).__name__, e)
            raise BundleError(f"the SLM does not load as a {manifest.arch} sequence classifier "
                              f"({type(e).__name__}); save it with save_pretrained (safetensors) and its "
                              "tokenizer") from e
        _check_loading_info(info)
        model.eval()
        n_params = 0
        for name, tensor in model.state_dict().items():
            n_params += tensor.numel()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise BundleError(f"tensor {name!r} holds NaN or Inf values: an SLM with non-finite weights "
                                  "cannot score; retrain it")
        if model.config.num_labels != len(manifest.labels):
            raise BundleError(f"the model has {model.config.num_labels} outputs but the manifest names "
                              f"{len(manifest.labels)} labels")
        with torch.no_grad():
            enc = tokenizer(list(PROBE_TEXTS), padding=True, truncation=True, max_length=32, return_tensors="pt")
            probs = torch.softmax(model(**enc).logits.float() / temperature, dim=-1)
        if probs.shape != (len(PROBE_TEXTS), len(manifest.labels)) or not bool(torch.isfinite(probs).all()):
            raise BundleError("the SLM's outputs on probe texts are not finite probabilities over its labels: "
                              "it cannot score; retrain it")
        return {"tensors": len(model.state_dict()), "parameters": n_params}


def _check_loading_info(info: Mapping[str, list]) -> None:
    """Tensors the architecture has but the file lacks (re-initialised at random), or the reverse."""
    missing = list(info.get("missing_keys") or ())
    unexpected = list(info.get("unexpected_keys") or ())
    mismatched = [k for k, *_ in (info.get("mismatched_keys") or ())]
    if missing or unexpected or mismatched:
        def few(keys: list) -> str:
            return ", ".join(map(str, sorted(keys)[:5])) + (" …" if len(keys) > 5 else "")
        parts = [f"{len(keys)} {what} ({few(keys)})" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", mismatched)) if keys]
        raise BundleError("model.safetensors does not match the architecture in config.json: tensors "
                          + "; ".join(parts) + ". Save the model with save_pretrained from the same class")
