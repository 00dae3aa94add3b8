"""Helpers for the image tests: paths, the ansible tool venv, the refvalues module."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
ANSIBLE_BIN = ANSIBLE_DIR / ".venv" / "bin"
IMAGE_DIR = REPO / "image"


@pytest.fixture(scope="session")
def ansible_bin() -> Path:
    """ansible/.venv/bin, installed by `make ansible-tools` (.ci/run does that before tests)."""
    if not (ANSIBLE_BIN / "ansible-playbook").is_file():
        pytest.skip("ansible tools not installed: run `make ansible-tools`")
    return ANSIBLE_BIN


def ansible_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["ANSIBLE_CONFIG"] = str(ANSIBLE_DIR / "ansible.cfg")
    env["ANSIBLE_LOCAL_TEMP"] = str(tmp_path / "ansible-local")
    env["ANSIBLE_HOME"] = str(tmp_path / "ansible-home")
    env["ANSIBLE_NOCOLOR"] = "1"
    return env


@pytest.fixture(scope="session")
def refvalues() -> ModuleType:
    """image/refvalues.py, imported by path (image/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "tdllm_image_refvalues", IMAGE_DIR / "refvalues.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require_root_build_tools() -> None:
    """Skip unless the slow image tests can run: root and the Debian build tools."""
    if os.geteuid() != 0:
        pytest.skip("image builds need root")
    missing = [
        t for t in ("mmdebstrap", "veritysetup", "qemu-system-x86_64") if not shutil.which(t)
    ]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: run `make image-deps`")
