"""Peer admission: the content check an uploaded SLM passes before it may score anyone's round.

`validate_bundle_dir` (shared/bundle.py) checks the files without loading them. This module
loads the SLM the way the engines do (transformers' safetensors loader, on CPU) and checks
what they need from it: the task is served and its labels are the task's, every tensor the
architecture has is in the file and no other (a missing tensor would be re-initialised at
random), every weight is finite, and the calibrated outputs on a few fixed probe texts are
finite probabilities.

The check runs a silo's bytes through a deserialiser, so it runs apart from the server
(`IsolatedChecker`): in one spawned process, one bundle at a time, with its address space
capped at `admission_memory_bytes` above what the process needs idle and a deadline of
`admission_timeout_s`. A check past either bound is a refused bundle, the process is replaced,
and the server itself never holds more than one check's memory nor waits on one for ever.

The rule (docs/service.md, "Peer admission"): an SLM scores other silos' rounds only after it
passed this check at upload *and* its own round succeeded (`Store.finish` makes it the silo's
peer; a failed round never does).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from crosslm_shared.bundle import META_FILE, Manifest, check_temperature
from crosslm_shared.errors import BundleError
from crosslm_shared.logs import quiet_ml_logging

log = logging.getLogger(__name__)
PROBE_TEXTS = ("a good film", "a bad film", "call now to win a prize", "what is the capital of france",
               "the", "")
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
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    temperature = check_temperature(meta.get("temperature", manifest.temperature), f"{META_FILE} temperature")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            folder, use_safetensors=True, output_loading_info=True, device_map=None)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - whatever the loader says, the bundle is unusable
        if _out_of_memory(e):
            raise MemoryError(str(e)) from e
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


def _out_of_memory(e: BaseException | None) -> bool:
    """A failed allocation, however the library reports it: Python's MemoryError, torch's
    RuntimeError, an mmap's ENOMEM (safetensors), here or in the error's cause."""
    seen = 0
    while e is not None and seen < 8:
        text = str(e).lower()
        if (isinstance(e, MemoryError) or getattr(e, "errno", None) == errno.ENOMEM
                or any(m in text for m in ("can't allocate memory", "cannot allocate memory", "out of memory",
                                        "can't start new thread"))):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


Check = Callable[[Path, Manifest], Mapping[str, int]]


class IsolatedChecker:
    """Runs a content check (a module-level function, e.g. `check_slm`) in a separate process.

    One child process (`python -m crosslm_server.engines.admission`), started on first use or by
    `start`, reused while it stays healthy; one check at a time. The child imports torch and
    transformers, then caps its own address space at what it uses then plus `memory_bytes`
    (RLIMIT_AS, Linux). The caller waits at most `timeout_s` (the child's start included). A
    check out of memory or time, or a child that dies, raises BundleError naming the bound,
    and the child is replaced before the next check. Messages are length-prefixed pickles on
    the child's stdin and stdout; only the server writes the child's stdin.
    """

    def __init__(self, *, timeout_s: float, memory_bytes: int):
        self.timeout_s, self.memory_bytes = float(timeout_s), int(memory_bytes)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._checks = 0  # checks the current child answered

    def start(self) -> None:
        """Start the child now (its imports take seconds), so the first upload does not wait."""
        with self._lock:
            self._ensure()

    def __call__(self, check: Check, folder: Path, manifest: Manifest) -> Mapping[str, int]:
        with self._lock:
            fresh = self._checks == 0  # no earlier check ran in this child (0 again after every _stop)
            kind, value = self._run(check, folder, manifest)
            if kind in ("memory", "died") and not fresh:
                self._stop()  # what earlier checks left in the child may be what ran out: once more, fresh
                kind, value = self._run(check, folder, manifest)
            if kind not in ("ok", "refused"):
                self._stop()  # out of time or memory, or dead: the next check gets a fresh child
        if kind == "ok":
            return value
        if kind == "refused":
            raise BundleError(value)
        if kind == "timeout":
            log.warning("content check of a bundle from silo %s: past admission_timeout_s", manifest.silo)
            raise BundleError(f"the content check of this SLM took longer than the server's "
                              f"admission_timeout_s={self.timeout_s:g}: send a smaller SLM, or ask the "
                              "operator to raise the limit")
        if kind in ("memory", "died"):
            log.warning("content check of a bundle from silo %s: %s", manifest.silo,
                        "out of memory" if kind == "memory" else "the checking process died")
            raise BundleError(f"the content check of this SLM needed more memory than the server's "
                              f"admission_memory_bytes={self.memory_bytes} (or its process died): send a "
                              "smaller SLM, or ask the operator to raise the limit")
        log.error("content check of a bundle from silo %s failed in the checker: %s", manifest.silo, value)
        raise RuntimeError(f"the content check failed: {value}")

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _run(self, check: Check, folder: Path, manifest: Manifest) -> tuple[str, object]:
        proc = self._ensure()
        deadline = time.monotonic() + self.timeout_s
        try:
            _send(proc.stdin, (check, str(folder), manifest))
            reply = _receive(proc.stdout.fileno(), deadline)
            self._checks += 1
            return reply
        except TimeoutError:
            return "timeout", None
        except (EOFError, OSError, pickle.UnpicklingError):
            return "died", None

    def _ensure(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._stop()
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
                       CROSSLM_ADMISSION_MEMORY_BYTES=str(self.memory_bytes),
                       MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1")  # few arenas: address space is memory here
            self._proc = subprocess.Popen([sys.executable, "-m", "crosslm_server.engines.admission"], env=env,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        return self._proc

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(5)
            for pipe in (self._proc.stdin, self._proc.stdout):
                pipe.close()
        self._proc, self._checks = None, 0


def _send(stream, message: object) -> None:
    data = pickle.dumps(message)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(fd: int, deadline: float | None = None) -> object:
    """One message from a raw file descriptor; TimeoutError past `deadline` (monotonic)."""
    def read(n: int) -> bytes:
        out = b""
        while len(out) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError
            part = os.read(fd, n - len(out))
            if not part:
                raise EOFError
            out += part
        return out
    (size,) = struct.unpack("<Q", read(8))
    return pickle.loads(read(size))  # noqa: S301 - the peer is our own child process


def _serve_checks() -> None:  # pragma: no cover - runs in the child process
    """The child: answer checks until the server closes our stdin."""
    import resource

    reply_to = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the replies
    import safetensors.torch  # noqa: F401 - the libraries are loaded before the cap, so it is for the check alone
    import tokenizers  # noqa: F401
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401

    torch.set_num_threads(1)
    quiet_ml_logging()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s (checker): %(message)s")
    memory_bytes = int(os.environ["CROSSLM_ADMISSION_MEMORY_BYTES"])
    try:
        with open("/proc/self/statm") as f:  # Linux; elsewhere only the deadline bounds a check
            idle = int(f.read().split()[0]) * resource.getpagesize()
    except OSError:
        idle = None
    if idle is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = idle + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    while True:
        try:
            check, folder, manifest = _receive(0)
        except EOFError:
            return  # the server went away
        try:
            reply = ("ok", dict(check(Path(folder), manifest)))
        except BundleError as e:
            reply = ("refused", str(e))
        except BaseException as e:  # noqa: BLE001 - reported to the server, which decides
            reply = ("memory", None) if _out_of_memory(e) else ("error", f"{type(e).__name__}: {e}")
        _send(reply_to, reply)


if __name__ == "__main__":
    _serve_checks()
