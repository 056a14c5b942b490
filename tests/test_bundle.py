"""Bundle manifest and on-disk validation: allow-list, no pickle, config and safetensors checks."""
import json
import struct
from dataclasses import replace

import pytest

from fakes.tiny_slm import new_tiny_slm
from crosslm_shared.bundle import (FileEntry, make_manifest, validate_bundle_dir, validate_manifest)
from crosslm_shared.errors import BundleError, ResourceExhaustedError

LABELS = ("neg", "pos")


@pytest.fixture(scope="module")
def slm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("slm")
    return new_tiny_slm(LABELS, tokenizer_dir=root / "tok").save(root / "model")


def test_a_saved_tiny_slm_is_a_valid_bundle(slm_dir):
    m = make_manifest(slm_dir, task="rt", silo="a", arch="tiny", labels=LABELS, temperature=1.5)
    assert {f.name for f in m.files} >= {"config.json", "model.safetensors", "crosslm.json"}
    validate_manifest(m)
    validate_bundle_dir(slm_dir, m)


@pytest.mark.parametrize("change, fragment", [
    (lambda m: replace(m, files=m.files + (FileEntry("pytorch_model.bin", 1, "0" * 64),)), "not allowed"),
    (lambda m: replace(m, files=tuple(f for f in m.files if f.name != "model.safetensors")), "lacks required"),
    (lambda m: replace(m, files=m.files + m.files[:1]), "twice"),
    (lambda m: replace(m, labels=("pos", "pos")), "distinct labels"),
    (lambda m: replace(m, silo="../etc"), "manifest.silo"),
    (lambda m: replace(m, temperature=0.0), "temperature"),
    (lambda m: replace(m, files=(replace(m.files[0], sha256="XYZ"),) + m.files[1:]), "hex"),
])
def test_bad_manifests_are_refused_with_a_reason(slm_dir, change, fragment):
    m = make_manifest(slm_dir, task="rt", silo="a", arch="tiny", labels=LABELS)
    with pytest.raises(BundleError, match=fragment):
        validate_manifest(change(m))


def test_size_cap_is_resource_exhausted(slm_dir):
    m = make_manifest(slm_dir, task="rt", silo="a", arch="tiny", labels=LABELS)
    with pytest.raises(ResourceExhaustedError, match="cap"):
        validate_manifest(m, max_bundle_bytes=1000)


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c | {"auto_map": {"AutoModel": "evil.Model"}}, "auto_map"),
    (lambda c: c | {"model_type": "llama"}, "model_type"),
    (lambda c: c | {"id2label": {"0": "pos", "1": "neg"}}, "does not match"),
])
def test_config_checks(slm_dir, tmp_path, edit, fragment):
    d = _copy(slm_dir, tmp_path / "b")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(edit(cfg)))
    m = make_manifest(d, task="rt", silo="a", arch="tiny", labels=LABELS)
    with pytest.raises(BundleError, match=fragment):
        validate_bundle_dir(d, m)


@pytest.mark.parametrize("header, fragment", [
    (struct.pack("<Q", 1 << 40), "header claims"),
    (struct.pack("<Q", 2) + b"{}" , None),
    (struct.pack("<Q", 80) + json.dumps({"w": {"dtype": "O", "shape": [1], "data_offsets": [0, 1]}}).encode().ljust(80) + b"x", "dtype"),
    (struct.pack("<Q", 80) + json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 99]}}).encode().ljust(80), "outside"),
])
def test_safetensors_header_checks(slm_dir, tmp_path, header, fragment):
    d = _copy(slm_dir, tmp_path / "b")
    (d / "model.safetensors").write_bytes(header)
    m = make_manifest(d, task="rt", silo="a", arch="tiny", labels=LABELS)
    if fragment is None:
        validate_bundle_dir(d, m)
    else:
        with pytest.raises(BundleError, match=fragment):
            validate_bundle_dir(d, m)
