"""The house's shape (docs/engine.md, README "Layout"): four parts in `crosslm_server/`, one-way
imports between them and the silo side, and small modules."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "crosslm_server"
PARTS = {"method", "engines", "service", "experiments"}
MAX_LINES = 400


def _modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "protos" not in p.parts)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_crosslm_server_holds_four_parts_and_no_loose_module():
    assert {p.name for p in SERVER.iterdir() if p.is_dir() and p.name != "__pycache__"} == PARTS
    assert [p.name for p in SERVER.glob("*.py")] == ["__init__.py"]


def test_nothing_in_crosslm_server_imports_the_silo_side():
    offenders = {_rel(p): sorted(n for n in _imports(p) if n.split(".")[0] == "crosslm_client")
                 for p in _modules(SERVER)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_silo_side_imports_nothing_of_the_server():
    offenders = {_rel(p): sorted(n for n in _imports(p) if n.split(".")[0] == "crosslm_server")
                 for p in _modules(ROOT / "crosslm_client") + _modules(ROOT / "shared")}
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("part, banned", [
    ("method", ("grpc", "grpc_health", "crosslm_server.service", "crosslm_server.engines",
                "crosslm_server.experiments", "fastapi", "starlette", "uvicorn", "http.server", "sqlite3")),
    ("engines", ("grpc", "crosslm_server.service", "crosslm_server.experiments")),
])
def test_the_algorithm_and_the_engines_know_nothing_of_the_service(part, banned):
    offenders = {_rel(p): sorted(n for n in _imports(p) if any(n == b or n.startswith(b + ".") for b in banned))
                 for p in _modules(SERVER / part)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_module_is_over_the_line_limit():
    long = {_rel(p): n for p in _modules(SERVER) + _modules(ROOT / "crosslm_client") + _modules(ROOT / "shared")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these modules (over {MAX_LINES} lines)"


@pytest.mark.parametrize("argv", [
    ["study", "--config", str(ROOT / "examples" / "rt-4silo.toml"), "--out", "{tmp}/study", "--seeds", "1",
     "--summary-only"],
    ["demo-report", "silo-a={tmp}/no-such-silo", "--out", "{tmp}/report"],
], ids=["study --summary-only", "demo-report"])
def test_commands_that_only_read_files_import_no_torch(tmp_path, argv):
    import subprocess
    import sys

    code = ("import sys\nfrom crosslm_server.experiments.cli import main\n"
            f"rc = main({[a.replace('{tmp}', str(tmp_path)) for a in argv]!r})\n"
            "print('torch' in sys.modules, rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split()[-2:] == ["False", "1"], out.stdout + out.stderr  # 1: nothing finished / no reports
