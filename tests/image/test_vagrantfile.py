"""The Vagrantfile validates in both profiles and rejects a malformed knob."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.image.conftest import REPO


def vagrant_validate(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    vagrant = shutil.which("vagrant")
    if vagrant is None:
        pytest.skip("vagrant not installed: image/scripts/install-deps.sh vagrant")
    return subprocess.run(
        [vagrant, "validate"],
        cwd=REPO,
        # VAGRANT_DOTFILE_PATH: vagrant would otherwise write .vagrant/ into the checkout.
        env=dict(os.environ)
        | {"VAGRANT_HOME": str(tmp_path / "home"), "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot")}
        | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("tdx", ["0", "1"])
def test_vagrantfile_validates(tmp_path: Path, tdx: str) -> None:
    result = vagrant_validate(tmp_path, TDLLM_VAGRANT_TDX=tdx)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


def test_vagrantfile_rejects_a_non_numeric_cpu_count(tmp_path: Path) -> None:
    result = vagrant_validate(tmp_path, TDLLM_VAGRANT_CPUS="many")
    assert result.returncode != 0
    assert "many" in result.stdout + result.stderr
