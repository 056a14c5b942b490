import pytest

from crosslm_shared.assets import package_file
from crosslm_shared.errors import AssetMissingError


def test_missing_package_names_it_and_the_install_command():
    with pytest.raises(AssetMissingError, match=r"'no-such-pkg-xyz'.*requirements/assets.txt"):
        package_file("no-such-pkg-xyz", "a/b.txt")


def test_missing_file_in_installed_package_says_reinstall():
    with pytest.raises(AssetMissingError, match="force-reinstall pytest"):
        package_file("pytest", "no/such/file.bin")
