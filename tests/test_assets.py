import pytest

from crosslm_shared.assets import package_file
from crosslm_shared.errors import AssetMissingError


def test_missing_package_names_it_and_the_install_command():
    with pytest.raises(AssetMissingError, match=r"'no-such-pkg-xyz'.*requirements/lock.txt"):
        package_file("no-such-pkg-xyz", "a/b.txt")


def test_missing_file_in_installed_package_says_reinstall():
    with pytest.raises(AssetMissingError, match="force-reinstall pytest"):
        package_file("pytest", "no/such/file.bin")


def _fake_mpnet_parts(tmp_path, monkeypatch):
    """A tiny zipped 'model' split in five parts, served as the five MPNet packages' files."""
    import io
    import zipfile

    from crosslm_shared import assets

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        zf.writestr("all-mpnet-base-v2/weights.bin", bytes(range(256)) * 4000)
    blob = buf.getvalue()
    step = -(-len(blob) // 5)
    parts = {}
    for i in range(5):
        part = tmp_path / "pkgs" / f"part{i + 1}"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(blob[i * step:(i + 1) * step])
        parts[assets.MPNET_PARTS[i]] = part
    monkeypatch.setattr(assets, "package_file", lambda pkg, rel: parts[pkg])
    monkeypatch.setenv("CROSSLM_CACHE", str(tmp_path / "cache"))


def test_mpnet_assembly_from_parts(tmp_path, monkeypatch):
    from crosslm_shared.assets import mpnet_dir

    _fake_mpnet_parts(tmp_path, monkeypatch)
    folder = mpnet_dir()
    assert (folder / "config.json").read_text() == '{"model_type": "mpnet"}'
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["all-mpnet-base-v2"]  # no partials left
    assert mpnet_dir() == folder


def test_concurrent_mpnet_assembly_does_not_collide(tmp_path, monkeypatch):
    """Two studies on one machine assembled MPNet at once and one crashed on the other's partial
    folder (measured 2026-12-02); each writer now has its own."""
    from concurrent.futures import ThreadPoolExecutor

    from crosslm_shared.assets import mpnet_dir

    _fake_mpnet_parts(tmp_path, monkeypatch)
    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: mpnet_dir(), range(8)))
    assert len(set(folders)) == 1
    assert (folders[0] / "weights.bin").stat().st_size == 256 * 4000
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["all-mpnet-base-v2"]
