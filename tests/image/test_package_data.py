"""Every data file the code ships beside its modules is in its distribution's package-data, so
an installed wheel (the TD image) holds what a source checkout does. Caught late once: the
pinned public reference of `split` was missing from the wheel."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# beside the code for readers of the tree, not for the installed package
NOT_SHIPPED = {"README.md"}


def _package_data(distribution: Path) -> dict[str, list[str]]:
    config = tomllib.loads((distribution / "pyproject.toml").read_text())
    globs: dict[str, list[str]] = config["tool"]["setuptools"]["package-data"]
    return globs


def _shipped(package_dir: Path, relative: Path, globs: dict[str, list[str]]) -> bool:
    """Whether setuptools' package-data (package -> globs relative to that package) takes it."""
    for package, patterns in globs.items():
        base = Path(*package.split("."))
        if relative.parts[: len(base.parts)] != base.parts:
            continue
        inner = Path(*relative.parts[len(base.parts) :]).as_posix()
        if any(fnmatch.fnmatchcase(inner, p) for p in patterns):
            return True
    return False


@pytest.mark.parametrize(
    ("distribution", "package"),
    [("service", "tdllm"), ("attestation", "tdllm_attest"), ("service/lab", "tdllm_lab")],
)
def test_every_data_file_beside_the_code_is_in_package_data(
    distribution: str, package: str
) -> None:
    src = ROOT / distribution / "src"
    globs = _package_data(ROOT / distribution)
    data = [
        p.relative_to(src)
        for p in (src / package).rglob("*")
        if p.is_file()
        and p.suffix not in {".py", ".pyc"}
        and "__pycache__" not in p.parts
        and p.name not in NOT_SHIPPED
    ]
    assert data, "found no data files: the scan is broken"
    missing = [str(p) for p in data if not _shipped(src, p, globs)]
    assert not missing, f"not in {distribution}/pyproject.toml package-data: {missing}"
