"""The committed stubs in shared/protos/ must be exactly what scripts/gen_protos makes now."""
import runpy
from pathlib import Path

import crosslm_shared

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = Path(crosslm_shared.__file__).parent / "protos"


def test_committed_stubs_match_the_proto(tmp_path):
    gen = runpy.run_path(str(ROOT / "scripts" / "gen_protos"))
    written = gen["generate"](tmp_path)
    assert written, "gen_protos wrote nothing"
    for fresh in written:
        rel = fresh.relative_to(tmp_path)
        committed = COMMITTED / rel
        assert committed.exists(), f"{rel} is missing: run scripts/gen_protos and commit"
        assert committed.read_text() == fresh.read_text(), (
            f"{rel} is stale against protos/: run scripts/gen_protos and commit")


def test_stubs_import_under_the_package_name():
    from crosslm_shared.protos.crosslm.v1 import crosslm_pb2, crosslm_pb2_grpc

    assert crosslm_pb2.DESCRIPTOR.package == "crosslm.v1"
    assert hasattr(crosslm_pb2_grpc, "CrossLMServicer")
