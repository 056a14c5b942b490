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


def test_stubs_were_made_by_the_locked_grpcio_tools_and_the_runtime_accepts_them():
    """The staleness check above is only meaningful with the lock's grpcio-tools; the stubs refuse
    to import under a grpcio older than the tools that made them."""
    import importlib.metadata as md
    import re

    from packaging.version import Version

    lock = (ROOT / "requirements" / "lock.txt").read_text()
    tools = re.search(r"^grpcio-tools==(\S+)", lock, re.M).group(1)
    runtime = re.search(r"^grpcio==(\S+)", lock, re.M).group(1)
    stub = (COMMITTED / "crosslm" / "v1" / "crosslm_pb2_grpc.py").read_text()
    generated = re.search(r"^GRPC_GENERATED_VERSION = '(\S+)'", stub, re.M).group(1)
    assert md.version("grpcio-tools") == tools, "run the tests in the locked environment (scripts/bootstrap)"
    assert generated == tools, f"stubs made by grpcio-tools {generated}, the lock has {tools}: run scripts/gen_protos"
    assert Version(runtime) >= Version(generated)
