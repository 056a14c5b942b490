"""The SLM bundle: a `save_pretrained` folder plus a manifest, and its validation.

A bundle is checked twice, both times before anything is loaded: the manifest as soon as it
arrives (names, sizes, hashes, labels: no bytes accepted before that), and the files once
they are on disk (config.json, the safetensors header). Nothing here unpickles or imports
model code: `*.bin` / `*.pt` are not on the allow-list, `auto_map` is refused, and
`model_type` must be one of a few known classifier families.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from crosslm_shared.errors import BundleError, ResourceExhaustedError

META_FILE = "crosslm.json"
REQUIRED_FILES = frozenset({"config.json", "model.safetensors", META_FILE})
ALLOWED_FILES = REQUIRED_FILES | frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json",
})
# files only a result carries: the synthetic set the silo continues on (texts the LLM wrote,
# never a silo's data). An upload naming one is refused: a silo sends weights, nothing else.
SYNTHETIC_FILE = "synthetic.jsonl"
RESULT_FILES = frozenset({SYNTHETIC_FILE})
MAX_SYNTHETIC_BYTES = 32 * 1024 * 1024
MAX_SYNTHETIC_TEXT = 4000
ALLOWED_MODEL_TYPES = frozenset({"bert", "mpnet"})
ALLOWED_DTYPES = frozenset({"F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL"})
MAX_SAFETENSORS_HEADER = 16 * 1024 * 1024
MAX_CONFIG_BYTES = 1024 * 1024
MAX_META_BYTES = 64 * 1024
# a task has a handful of labels (the built-in ones 2-6); the cap bounds what one manifest costs
# to check and to store (issue 24: 500,000 labels made a 6 MB manifest row)
MAX_LABELS = 64
MAX_LABEL_CHARS = 64
# calibrate_temperature searches [0.05, 20]; outside a wide margin of that a scorer is degenerate
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
DEFAULT_MAX_BUNDLE_BYTES = 2 * 1024**3
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What travels with an SLM (DESIGN.md §3); `labels` are in class-index order."""

    task: str
    silo: str
    arch: str
    labels: tuple[str, ...]
    temperature: float = 1.0
    heldout_accuracy: float = 0.0
    files: tuple[FileEntry, ...] = field(default_factory=tuple)

    def file(self, name: str) -> FileEntry:
        for entry in self.files:
            if entry.name == name:
                return entry
        raise BundleError(f"file {name!r} is not in the bundle manifest; "
                          f"it lists {[f.name for f in self.files]}")

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def validate_manifest(manifest: Manifest, *, max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
                      result: bool = False) -> None:
    """Raise BundleError (or ResourceExhaustedError for size caps) unless the manifest is sound.

    Contract: a manifest that passes names only allow-listed, distinct files, includes every
    required file, has well-formed hashes, fits the size cap, and names distinct labels.
    ``result`` manifests (server to silo) may also carry the synthetic set.
    """
    for key in ("task", "silo", "arch"):
        value = getattr(manifest, key)
        if not NAME_RE.match(value):
            raise BundleError(f"manifest.{key}={value!r} is not a valid name: use letters, "
                              "digits, '.', '_' or '-' (at most 64 characters)")
    if len(manifest.labels) > MAX_LABELS:
        raise ResourceExhaustedError(f"manifest.labels has {len(manifest.labels)} labels; the cap is {MAX_LABELS} "
                                     "(a task has a few labels): send the task's label names in class order")
    if len(manifest.labels) < 2 or len(set(manifest.labels)) != len(manifest.labels):
        raise BundleError(f"manifest.labels={list(manifest.labels)!r} must name at least two "
                          "distinct labels, in class-index order")
    for label in manifest.labels:
        if not 0 < len(label) <= MAX_LABEL_CHARS or not label.isprintable():
            raise BundleError(f"manifest label {label[:80]!r} must be 1-{MAX_LABEL_CHARS} printable characters")
    check_temperature(manifest.temperature, "manifest.temperature")
    if not 0.0 <= manifest.heldout_accuracy <= 1.0:  # NaN fails this too
        raise BundleError(f"manifest.heldout_accuracy={manifest.heldout_accuracy!r} must be a number in [0, 1]")
    names = [f.name for f in manifest.files]
    if len(set(names)) != len(names):
        raise BundleError(f"manifest lists a file twice: {names}")
    for entry in manifest.files:
        if entry.name in RESULT_FILES and not result:
            raise BundleError(f"file {entry.name!r} travels only from the server to a silo; "
                              "an upload carries the SLM's weights, config and tokenizer")
        if entry.name not in ALLOWED_FILES | RESULT_FILES:
            raise BundleError(f"file {entry.name!r} is not allowed in a bundle; allowed: "
                              f"{sorted(ALLOWED_FILES)} (no pickled *.bin / *.pt weights)")
        if not SHA256_RE.match(entry.sha256):
            raise BundleError(f"file {entry.name!r}: sha256 {entry.sha256!r} is not 64 lower-case hex digits")
        if entry.size < 0:
            raise BundleError(f"file {entry.name!r}: size {entry.size} is negative")
    missing = REQUIRED_FILES - set(names)
    if missing:
        raise BundleError(f"bundle lacks required file(s) {sorted(missing)}: send a "
                          "save_pretrained folder with safetensors weights")
    if manifest.total_size > max_bundle_bytes:
        raise ResourceExhaustedError(f"bundle of {manifest.total_size} bytes exceeds the "
                                     f"server's cap of {max_bundle_bytes} bytes")


def check_temperature(value: float, what: str) -> float:
    """A calibration temperature a scorer can use: finite, in [MIN_TEMPERATURE, MAX_TEMPERATURE]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:  # NaN and inf fail the comparison
        raise BundleError(f"{what}={value!r} must be a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}] "
                          "(calibrate_temperature gives 0.05-20)")
    return float(value)


def check_safetensors_prefix(head: bytes, size: int) -> None:
    """The first 8 bytes of model.safetensors (its header length) against the cap and the file size.

    Checked as soon as those bytes arrive, so a bogus header is refused before the rest is sent.
    """
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_SAFETENSORS_HEADER or n + 8 > size:
        raise BundleError(f"model.safetensors header claims {n} bytes (cap "
                          f"{MAX_SAFETENSORS_HEADER}, file {size}): not a safetensors file")


def validate_bundle_dir(folder: Path, manifest: Manifest) -> None:
    """Check the files on disk against the manifest without loading any weights.

    Contract: raises BundleError unless config.json is a plain classifier config of an
    allowed model_type with the manifest's labels, and model.safetensors has a sane header
    (size cap, JSON, allowed dtypes, offsets inside the file).
    """
    for entry in manifest.files:
        path = folder / entry.name
        if not path.is_file() or path.stat().st_size != entry.size:
            raise BundleError(f"bundle file {entry.name!r} is missing or not {entry.size} bytes")
    _check_config(folder / "config.json", manifest.labels)
    _check_meta(folder / META_FILE, manifest.labels)
    _check_safetensors(folder / "model.safetensors")
    if any(entry.name == SYNTHETIC_FILE for entry in manifest.files):
        read_synthetic(folder / SYNTHETIC_FILE, len(manifest.labels))


def write_synthetic(path: Path, texts, targets) -> Path:
    """One JSON object per line: {"text": ..., "target": [p_0, ..., p_K-1]}."""
    with path.open("w", encoding="utf-8") as fh:
        for text, target in zip(texts, targets):
            fh.write(json.dumps({"text": text, "target": [float(x) for x in target]}) + "\n")
    return path


def read_synthetic(path: Path, k: int) -> tuple[list[str], list[list[float]]]:
    """Read and check a synthetic set: bounded size, string texts, K non-negative targets summing to 1."""
    if path.stat().st_size > MAX_SYNTHETIC_BYTES:
        raise BundleError(f"{SYNTHETIC_FILE} is larger than {MAX_SYNTHETIC_BYTES} bytes")
    texts, targets = [], []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            try:
                row = json.loads(line)
                text, target = row["text"], [float(x) for x in row["target"]]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise BundleError(f"{SYNTHETIC_FILE} line {n}: want {{\"text\": str, \"target\": [float]}}: {e}") from e
            if not isinstance(text, str) or len(text) > MAX_SYNTHETIC_TEXT:
                raise BundleError(f"{SYNTHETIC_FILE} line {n}: text must be a string of at most "
                                  f"{MAX_SYNTHETIC_TEXT} characters")
            if len(target) != k or min(target) < 0 or abs(sum(target) - 1) > 1e-3:
                raise BundleError(f"{SYNTHETIC_FILE} line {n}: target must be {k} non-negative numbers summing to 1")
            texts.append(text)
            targets.append(target)
    return texts, targets


def _json_object(path: Path, *, max_bytes: int, holding: str = "") -> dict:
    """The JSON object in `path`, read only if it is at most `max_bytes`; a BundleError names the file."""
    if path.stat().st_size > max_bytes:
        raise BundleError(f"{path.name} is larger than {max_bytes} bytes")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path.name} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise BundleError(f"{path.name} must hold a JSON object{holding}")
    return value


def _check_config(path: Path, labels: tuple[str, ...]) -> None:
    config = _json_object(path, max_bytes=MAX_CONFIG_BYTES)
    if "auto_map" in config:
        raise BundleError("config.json has 'auto_map' (remote code): remote code is never run; "
                          "save the model with a stock transformers class")
    if config.get("model_type") not in ALLOWED_MODEL_TYPES:
        raise BundleError(f"config.json model_type={config.get('model_type')!r} is not allowed; "
                          f"allowed: {sorted(ALLOWED_MODEL_TYPES)}")
    id2label = config.get("id2label") or {}
    try:
        names = tuple(id2label[k] for k in sorted(id2label, key=int))
    except (ValueError, TypeError) as e:
        raise BundleError(f"config.json id2label has non-integer keys: {list(id2label)}") from e
    if names != tuple(labels):
        raise BundleError(f"config.json id2label {list(names)} does not match the manifest "
                          f"labels {list(labels)}: save the model with id2label set to the task labels")


def _check_meta(path: Path, labels: tuple[str, ...]) -> None:
    """crosslm.json (what every engine reads beside the weights): an object with the manifest's
    labels and, if given, a usable temperature."""
    meta = _json_object(path, max_bytes=MAX_META_BYTES, holding=" with labels, arch and temperature")
    if meta.get("labels") != list(labels):
        raise BundleError(f"{META_FILE} labels {meta.get('labels')!r} do not match the manifest labels "
                          f"{list(labels)}: save the SLM with the task's labels")
    if "temperature" in meta:
        check_temperature(meta["temperature"], f"{META_FILE} temperature")


def _check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise BundleError("model.safetensors is shorter than its 8-byte header length")
        check_safetensors_prefix(head, size)
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"model.safetensors header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise BundleError("model.safetensors header must be a JSON object")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in ALLOWED_DTYPES:
            raise BundleError(f"tensor {name!r} has dtype {info.get('dtype') if isinstance(info, dict) else info!r}; "
                              f"allowed: {sorted(ALLOWED_DTYPES)}")
        start, end = info.get("data_offsets", (-1, -1))
        if not 0 <= start <= end <= size - 8 - n:
            raise BundleError(f"tensor {name!r} data_offsets {info.get('data_offsets')} lie outside the file")


def _regular(path: Path) -> bool:
    """True for a regular file; a link or special file under an allow-listed name is refused,
    never followed: only the bytes of files inside the SLM folder may leave a silo."""
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode) or not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise BundleError(f"{path} is {kind}: a bundle sends only regular files inside the SLM folder; "
                          f"replace it with a copy of the file (or remove it)")
    return True


def open_regular(path: Path):
    """Open a bundle file for reading without following a link (O_NOFOLLOW): a file swapped for a
    link after the manifest was made is refused, not sent."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise BundleError(f"{path} cannot be opened as a regular file ({e.strerror}): a bundle sends only "
                          "regular files inside the SLM folder") from e
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise BundleError(f"{path} is not a regular file: a bundle sends only regular files inside the SLM folder")
    return f


def sha256_file(path: Path) -> str:
    """SHA-256 of a regular file inside a bundle (never through a link), read in blocks."""
    with open_regular(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def make_manifest(folder: Path, *, task: str, silo: str, arch: str, labels: tuple[str, ...] | list[str],
                  temperature: float = 1.0, heldout_accuracy: float = 0.0, result: bool = False) -> Manifest:
    """Describe the allow-listed files of a save_pretrained folder; other files are left out
    (the synthetic set too, unless this is a ``result`` going back to a silo)."""
    allowed = ALLOWED_FILES | RESULT_FILES if result else ALLOWED_FILES
    files = tuple(FileEntry(p.name, p.stat().st_size, sha256_file(p))
                  for p in sorted(folder.iterdir()) if p.name in allowed and _regular(p))
    manifest = Manifest(task=task, silo=silo, arch=arch, labels=tuple(labels),
                        temperature=float(temperature), heldout_accuracy=float(heldout_accuracy),
                        files=files)
    validate_manifest(manifest, max_bundle_bytes=2**63, result=result)
    return manifest
