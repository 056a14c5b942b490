"""Property-based checks (hypothesis) of manifest and chunk validation: whatever arrives, the
answer is a CrossLMError with a message, or acceptance of something that is really safe."""
import hashlib
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crosslm_shared.bundle import ALLOWED_FILES, REQUIRED_FILES, FileEntry, Manifest, validate_manifest
from crosslm_shared.errors import BundleError, CrossLMError, ResourceExhaustedError
from crosslm_shared.transfer import Chunk, PartialFile, crc32c

pytestmark = pytest.mark.hostile
CAP = 10_000

names = st.one_of(st.sampled_from(sorted(ALLOWED_FILES | {"pytorch_model.bin", "model.pt", "x.pkl", "../config.json",
                                                          "/etc/passwd", "config.json\0", ""})),
                  st.text(max_size=20))
entries = st.builds(FileEntry, name=names, size=st.integers(-5, 3 * CAP),
                    sha256=st.one_of(st.just("a" * 64), st.text(alphabet="0123456789abcdefABCDEF", max_size=70)))
manifests = st.builds(Manifest, task=st.one_of(st.just("rt"), st.text(max_size=70)),
                      silo=st.one_of(st.just("a"), st.text(max_size=70)),
                      arch=st.one_of(st.just("tiny"), st.text(max_size=10)),
                      labels=st.lists(st.text(min_size=0, max_size=8), max_size=5).map(tuple),
                      temperature=st.floats(allow_nan=True, allow_infinity=True),
                      heldout_accuracy=st.floats(0, 1),
                      files=st.lists(entries, max_size=6).map(tuple))


@settings(max_examples=300, deadline=None)
@given(manifests)
def test_a_manifest_is_refused_with_a_message_or_is_safe(manifest):
    try:
        validate_manifest(manifest, max_bundle_bytes=CAP)
    except (BundleError, ResourceExhaustedError) as e:
        assert str(e)  # says what is wrong
        return
    names = [f.name for f in manifest.files]
    assert set(names) <= ALLOWED_FILES and REQUIRED_FILES <= set(names) and len(set(names)) == len(names)
    assert all(0 <= f.size for f in manifest.files) and manifest.total_size <= CAP
    assert manifest.temperature > 0


# offset -1 stands for "the committed offset", so that well-formed sequences are common too
chunks = st.lists(st.tuples(st.integers(-1, 300), st.binary(max_size=120), st.booleans()), max_size=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(min_size=1, max_size=256), sends=chunks)
def test_chunks_never_write_past_the_size_or_off_the_committed_offset(content, sends):
    with tempfile.TemporaryDirectory() as tmp:
        final = Path(tmp) / "model.safetensors"
        part = PartialFile(final, size=len(content), sha256=hashlib.sha256(content).hexdigest())
        expected = b""
        for offset, data, good_crc in sends:
            offset = part.committed if offset == -1 else offset
            chunk = Chunk("model.safetensors", offset, data, crc32c(data) ^ (0 if good_crc else 1))
            try:
                part.write(chunk)
            except CrossLMError as e:
                assert str(e)
                continue
            assert offset == len(expected) and good_crc  # only the next bytes, intact, are taken
            expected += data
            assert part.committed == len(expected) <= len(content)
            assert part.part.read_bytes() == expected
        if part.done:
            try:
                part.finish()
            except BundleError:
                assert expected != content and not part.part.exists() and not final.exists()
            else:
                assert final.read_bytes() == content == expected
