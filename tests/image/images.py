"""Build and boot helpers for the slow image tests (root, Debian tools, several minutes)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.image.conftest import REPO

OVMF = Path("/usr/share/ovmf/OVMF.fd")
# Reuse artefacts a developer already built (`make image IMAGE_PROFILE=smoke`) instead of
# building again: TDLLM_SMOKE_IMAGE=image/out/smoke.
PREBUILT_ENV = "TDLLM_SMOKE_IMAGE"


def snapshot(dest: Path) -> Path:
    """A clone of the committed tree (edits in the working tree cannot leak into a build), with
    the tool venvs it needs linked in from this checkout."""
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(dest)], check=True)
    for venv in (".venv", "ansible/.venv"):
        (dest / venv).symlink_to(REPO / venv)
    return dest


def build(profile: str, out: Path, timeout_s: int = 3600, repo: Path = REPO) -> Path:
    """Run `repo`'s image/build.sh; return the profile's artefact directory."""
    started = time.monotonic()
    result = subprocess.run(
        [repo / "image" / "build.sh", "--profile", profile, "--out", out],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"build {profile}: {time.monotonic() - started:.0f} s")
    return out / profile


def artefact_digests(directory: Path) -> dict[str, str]:
    """name -> SHA-384 from the build's signed reference values, plus the verity root hash."""
    document = json.loads((directory / "reference-values.json").read_text())["policy"]
    digests = {name: entry["sha384"] for name, entry in document["artefacts"].items()}
    digests["verity.root_hash"] = document["verity"]["root_hash"]
    digests["cmdline"] = document["cmdline_sha384"]
    digests |= {f"manifest:{k}": v for k, v in document["manifests"].items()}
    return digests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Guest:
    """A TCG-booted guest with the service port forwarded to 127.0.0.1:port."""

    process: subprocess.Popen[bytes]
    port: int
    console: Path
    started: float

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def boot(artefacts: Path, root_image: Path, workdir: Path, memory_mib: int = 3072) -> Guest:
    """Boot the UKI with OVMF under TCG (never KVM: /dev/kvm is unusable on CI machines)."""
    port = free_port()
    console = workdir / f"console-{port}.log"
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None
    argv = [
        qemu,
        *("-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", str(memory_mib)),
        *("-machine", "q35", "-bios", str(OVMF), "-kernel", str(artefacts / "uki.efi")),
        *("-nodefaults", "-no-reboot", "-display", "none"),
        *("-serial", f"file:{console}"),
        *("-drive", f"file={root_image},if=none,id=root,format=raw,readonly=on"),
        *("-device", "virtio-blk-pci,drive=root"),
        *("-netdev", f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:8000"),
        *("-device", "virtio-net-pci,netdev=net0"),
    ]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Guest(process, port, console, time.monotonic())


def flip_byte_in_file(root_image: Path, path_in_fs: str, offset: int = 100) -> int:
    """Flip one byte of `path_in_fs`'s first data block inside the ext4 image; return its offset."""
    out = subprocess.run(
        ["debugfs", "-R", f"bmap {path_in_fs} 0", str(root_image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    block = int(out[-1])
    assert block > 0, f"no data block for {path_in_fs}"
    position = block * 4096 + offset
    with root_image.open("r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ 0x01]))
        f.flush()
        os.fsync(f.fileno())
    return position
