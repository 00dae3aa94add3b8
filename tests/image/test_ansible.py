"""The Ansible tree: production-profile lint, playbook syntax, and the TD launch templates."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.image.conftest import ANSIBLE_DIR, ansible_env

PLAYBOOKS = ("image.yml", "host.yml", "launch.yml")


def test_ansible_lint_production_profile_has_no_findings(ansible_bin: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [ansible_bin / "ansible-lint", "--profile", "production", "--nocolor"],
        cwd=ANSIBLE_DIR,
        env=ansible_env(tmp_path) | {"PATH": f"{ansible_bin}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failure(s), 0 warning(s)" in result.stdout + result.stderr


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_playbook_passes_syntax_check(ansible_bin: Path, tmp_path: Path, playbook: str) -> None:
    inventory = "build-chroot.yml" if playbook == "image.yml" else "tdx-hosts.yml"
    result = subprocess.run(
        [
            ansible_bin / "ansible-playbook",
            "--syntax-check",
            "-i",
            ANSIBLE_DIR / "inventory" / inventory,
            ANSIBLE_DIR / "playbooks" / playbook,
        ],
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def render_launch(ansible_bin: Path, tmp_path: Path, shape: dict[str, object]):  # type: ignore[no-untyped-def]
    """Run launch.yml on localhost with `shape` as extra vars; return the completed process."""
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(
        "tdx_hosts:\n  hosts:\n    localhost:\n      ansible_connection: local\n"
        "      ansible_python_interpreter: " + str(ansible_bin / "python") + "\n"
    )
    extra = tmp_path / "shape.json"
    extra.write_text(json.dumps({"td_launch_output_dir": str(tmp_path / "launch"), **shape}))
    return subprocess.run(
        [
            ansible_bin / "ansible-playbook",
            "-i",
            inventory,
            "-e",
            f"@{extra}",
            ANSIBLE_DIR / "playbooks" / "launch.yml",
        ],
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_launch_renders_a_tdx_domain_and_qemu_script_for_the_shape(
    ansible_bin: Path, tmp_path: Path
) -> None:
    shape = {
        "td_launch_vcpus": 12,
        "td_launch_memory_mib": 32768,
        "td_launch_gpus": ["0000:17:00.0", "0000:65:00.0"],
        "td_launch_tdvf": "/opt/tdvf/OVMF.tdx.fd",
        "td_launch_qgs_vsock_port": 4051,
    }
    result = render_launch(ansible_bin, tmp_path, shape)
    assert result.returncode == 0, result.stdout + result.stderr

    domain = ET.parse(tmp_path / "launch" / "domain.xml").getroot()  # noqa: S314 - our render
    security = domain.find("launchSecurity")
    assert security is not None and security.get("type") == "tdx"
    socket = security.find("quoteGenerationService/SocketAddress")
    assert socket is not None and (socket.get("type"), socket.get("port")) == ("vsock", "4051")
    assert domain.findtext("vcpu") == "12"
    assert domain.findtext("memory") == "32768"
    loader = domain.find("os/loader")
    assert loader is not None and loader.get("type") == "rom"
    assert loader.text == "/opt/tdvf/OVMF.tdx.fd"
    gpus = [
        (a.get("bus"), a.get("slot"), a.get("function"))
        for a in domain.findall("devices/hostdev/source/address")
    ]
    assert gpus == [("0x17", "0x00", "0x0"), ("0x65", "0x00", "0x0")]

    script = (tmp_path / "launch" / "launch-qemu.sh").read_text()
    assert "confidential-guest-support=tdx0" in script
    assert '"qom-type":"tdx-guest"' in script and '"port":"4051"' in script
    assert "-smp 12" in script and "-m 32768M" in script
    assert script.count("-device vfio-pci,host=") == 2
    assert "-accel tcg" not in script
    syntax = subprocess.run(["bash", "-n", tmp_path / "launch" / "launch-qemu.sh"], check=False)
    assert syntax.returncode == 0


def test_launch_without_gpus_renders_no_passthrough(ansible_bin: Path, tmp_path: Path) -> None:
    result = render_launch(ansible_bin, tmp_path, {"td_launch_gpus": []})
    assert result.returncode == 0, result.stdout + result.stderr
    domain = ET.parse(tmp_path / "launch" / "domain.xml").getroot()  # noqa: S314 - our render
    assert domain.findall("devices/hostdev") == []
    assert "vfio-pci" not in (tmp_path / "launch" / "launch-qemu.sh").read_text()


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ({"td_launch_vcpus": "many"}, "td_launch_vcpus"),
        ({"td_launch_gpus": ["17:00.0"]}, "bad deployment shape"),
        ({"td_launch_memory_mib": 256}, "bad deployment shape"),
    ],
)
def test_launch_rejects_a_bad_shape(
    ansible_bin: Path, tmp_path: Path, shape: dict[str, object], message: str
) -> None:
    result = render_launch(ansible_bin, tmp_path, shape)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "launch" / "domain.xml").exists()
