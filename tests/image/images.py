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


def boot(
    artefacts: Path,
    root_image: Path,
    workdir: Path,
    memory_mib: int = 3072,
    models_disk: Path | None = None,
    guest_to_host: dict[str, int] | None = None,
) -> Guest:
    """Boot the UKI with OVMF under TCG (never KVM: /dev/kvm is unusable on CI machines).

    `models_disk` is attached read-only after the root (which must stay /dev/vda);
    `guest_to_host` maps guest "ip:port" to host loopback ports (QEMU guestfwd, one socat per
    guest connection: the guest can reach nothing else of the host)."""
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
    ]
    if models_disk is not None:
        argv += [
            *("-drive", f"file={models_disk},if=none,id=models,format=raw,readonly=on"),
            *("-device", "virtio-blk-pci,drive=models"),
        ]
    forwards = "".join(
        f",guestfwd=tcp:{guest}-cmd:socat STDIO TCP:127.0.0.1:{host}"
        for guest, host in (guest_to_host or {}).items()
    )
    argv += [
        *("-netdev", f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:8000{forwards}"),
        *("-device", "virtio-net-pci,netdev=net0"),
    ]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Guest(process, port, console, time.monotonic())


def models_disk(sealed: Path, image: Path, service_gid: int) -> Path:
    """A read-only ext4 models disk (label tdllm-models) holding `sealed` as /sealed, readable
    by the service's group only (mke2fs -d copies owners and modes)."""
    tree = image.with_suffix(".tree")
    shutil.copytree(sealed, tree / "sealed")
    for path in [tree, *tree.rglob("*")]:
        os.chown(path, 0, service_gid)
        path.chmod(0o750 if path.is_dir() else 0o640)
    size = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file())
    blocks = (size * 12 // 10 + (64 << 20)) // 4096
    subprocess.run(
        [
            *("mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "tdllm-models"),
            *("-E", f"root_owner=0:{service_gid}", "-d", str(tree), str(image), str(blocks)),
        ],
        check=True,
    )
    shutil.rmtree(tree)
    return image


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
