"""A silo installs no server code: crosslm_client imports only crosslm_shared (and itself);
the service modules in shared/ import neither side."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_client_never_imports_the_server():
    for path in (ROOT / "crosslm_client").rglob("*.py"):
        assert "crosslm_server" not in imported_roots(path), path


def test_shared_service_modules_import_neither_side():
    for name in ("bundle", "transfer", "convert", "records", "certs"):
        roots = imported_roots(ROOT / "shared" / f"{name}.py")
        assert not roots & {"crosslm_server", "crosslm_client"}, name
