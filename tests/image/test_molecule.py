"""Molecule scenario `guest`: converge, idempotence and verify of the guest roles over chroot.

Slow: mmdebstrap makes a bare Debian root filesystem first (about two minutes).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.image.conftest import ANSIBLE_DIR, ansible_env, require_root_build_tools

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_guest_roles_converge_idempotently_and_verify(ansible_bin: Path, tmp_path: Path) -> None:
    require_root_build_tools()
    rootfs = tmp_path / "rootfs"
    subprocess.run(
        [
            "mmdebstrap",
            "--quiet",
            "--mode=root",
            "--variant=minbase",
            "--skip=cleanup/apt/lists",
            "--include=systemd,systemd-sysv,initramfs-tools,python3,python3-apt,python3-packaging,python3-venv",
            "bookworm",
            rootfs,
        ],
        check=True,
        timeout=900,
    )
    result = subprocess.run(
        [ansible_bin / "molecule", "test", "-s", "guest"],
        cwd=ANSIBLE_DIR,
        env=ansible_env(tmp_path)
        | {"MOLECULE_ROOTFS": str(rootfs), "PATH": f"{ansible_bin}:/usr/sbin:/usr/bin:/sbin:/bin"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "idempotence" in output.lower()
