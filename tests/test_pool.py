import numpy as np
import pytest

from crosslm_server.method.pool import SyntheticPool
from crosslm_shared.bundle import (SYNTHETIC_FILE, make_manifest, read_synthetic, validate_manifest,
                                   write_synthetic)
from crosslm_shared.errors import BundleError


def test_pool_grows_per_submission_once_and_survives_a_restart(tmp_path):
    pool = SyntheticPool(tmp_path)
    pool.add("rt", "sub-1", ["a", "b"], np.array([[1.0, 0.0], [0.0, 1.0]]))
    pool.add("rt", "sub-1", ["a", "b"], np.array([[1.0, 0.0], [0.0, 1.0]]))  # a rerun after a crash
    pool.add("rt", "sub-2", ["c"], np.array([[0.4, 0.6]]))
    pool.add("sms", "sub-3", ["x"], np.array([[0.5, 0.5]]))
    texts, targets = SyntheticPool(tmp_path).get("rt", 2)  # a new process reads the same pool
    assert texts == ["a", "b", "c"] and targets.shape == (3, 2)
    assert SyntheticPool(tmp_path, max_size=2).get("rt", 2)[0] == ["b", "c"]  # the newest examples
    with open(tmp_path / "rt.jsonl", "a") as fh:
        fh.write('{"submission": "sub-4", "te')  # torn write
    assert SyntheticPool(tmp_path).get("rt", 2)[0] == ["a", "b", "c"]
    memory = SyntheticPool()
    memory.add("rt", "r1", ["m"], np.array([[1.0, 0.0]]))
    assert memory.get("rt", 2)[0] == ["m"] and memory.get("sms", 2)[1].shape == (0, 2)


def test_synthetic_set_travels_only_in_results(tmp_path, tiny_slm_dir):
    from crosslm_shared.slm import new_slm

    folder = new_slm(str(tiny_slm_dir), ["neg", "pos"]).save(tmp_path / "slm")
    write_synthetic(folder / SYNTHETIC_FILE, ["nice film"], [[0.2, 0.8]])
    upload = make_manifest(folder, task="rt", silo="a", arch="tiny", labels=["neg", "pos"])
    assert SYNTHETIC_FILE not in [f.name for f in upload.files]  # a silo never sends it
    result = make_manifest(folder, task="rt", silo="a", arch="tiny", labels=["neg", "pos"], result=True)
    assert SYNTHETIC_FILE in [f.name for f in result.files]
    with pytest.raises(BundleError, match="only from the server"):
        validate_manifest(result)
    validate_manifest(result, result=True)
    assert read_synthetic(folder / SYNTHETIC_FILE, 2) == (["nice film"], [[0.2, 0.8]])


@pytest.mark.hostile
@pytest.mark.parametrize("line, match", [
    ('not json', "line 1"),
    ('{"text": 3, "target": [0.5, 0.5]}', "string"),
    ('{"text": "x", "target": [0.5, 0.6]}', "summing to 1"),
    ('{"text": "x", "target": [1.0]}', "2 non-negative"),
    ('{"text": "x", "target": [1.5, -0.5]}', "non-negative"),
    ('{"target": [0.5, 0.5]}', "line 1"),
])
def test_bad_synthetic_lines_are_refused(tmp_path, line, match):
    path = tmp_path / SYNTHETIC_FILE
    path.write_text(line + "\n")
    with pytest.raises(BundleError, match=match):
        read_synthetic(path, 2)
