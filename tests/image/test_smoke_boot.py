"""The smoke image boots under TCG and serves a completion; one flipped root byte stops it.

Slow (a build of several minutes, then TCG boots): `make test-image`. Set TDLLM_SMOKE_IMAGE to
an artefact directory from `make image IMAGE_PROFILE=smoke` to skip the build.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import requests

from tests.image.conftest import require_root_build_tools
from tests.image.images import PREBUILT_ENV, Guest, boot, build, flip_byte_in_file

# A build, a TCG boot (~6 min to /ready here) and a prompt through torch under TCG.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

HEALTH_TIMEOUT_S = 1200  # from QEMU start; TCG is 10-50x slower than a CPU
TAMPERED_WAIT_S = 420
# Read at every start of the service: its entry point script.
TAMPER_TARGET = "/opt/tdllm/venv/bin/tdllm"


@pytest.fixture(scope="module")
def smoke_artefacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_root_build_tools()
    prebuilt = os.environ.get(PREBUILT_ENV)
    if prebuilt:
        return Path(prebuilt).resolve()
    return build("smoke", tmp_path_factory.mktemp("image"))


def wait_for(guest: Guest, path: str, timeout_s: float) -> float | None:
    """Seconds from launch until `path` answered 200, or None (timeout or guest gone)."""
    deadline = guest.started + timeout_s
    while time.monotonic() < deadline and guest.process.poll() is None:
        try:
            if requests.get(f"http://127.0.0.1:{guest.port}{path}", timeout=5).status_code == 200:
                return time.monotonic() - guest.started
        except requests.RequestException:
            pass
        time.sleep(3)
    return None


def test_smoke_image_boots_and_answers_a_completion(smoke_artefacts: Path, tmp_path: Path) -> None:
    root = tmp_path / "root.img"
    shutil.copyfile(smoke_artefacts / "root.img", root)
    guest = boot(smoke_artefacts, root, tmp_path)
    try:
        healthy_after = wait_for(guest, "/health", HEALTH_TIMEOUT_S)
        assert healthy_after is not None, guest.console_text()[-4000:]
        # /health is liveness; the model loads after it (/ready).
        ready_after = wait_for(guest, "/ready", HEALTH_TIMEOUT_S)
        assert ready_after is not None, guest.console_text()[-4000:]
        print(
            f"TCG boot: /health 200 after {healthy_after:.0f} s, /ready after {ready_after:.0f} s"
        )
        base = f"http://127.0.0.1:{guest.port}/v1"
        (model,) = [m["id"] for m in requests.get(f"{base}/models", timeout=60).json()["data"]]
        started = time.monotonic()
        # A plain completion with a five-token prompt: prefill under TCG costs minutes.
        response = requests.post(
            f"{base}/completions",
            json={"model": model, "prompt": "The capital of France is", "max_tokens": 2},
            timeout=1800,
        )
        print(f"completion under TCG: {time.monotonic() - started:.0f} s")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"]
        assert body["usage"]["completion_tokens"] >= 1
    finally:
        guest.stop()


def test_one_flipped_root_byte_keeps_the_service_down(
    smoke_artefacts: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root.img"
    shutil.copyfile(smoke_artefacts / "root.img", root)
    flip_byte_in_file(root, TAMPER_TARGET)
    guest = boot(smoke_artefacts, root, tmp_path)
    try:
        assert wait_for(guest, "/health", TAMPERED_WAIT_S) is None
        console = guest.console_text()
        # dm-verity caught it: the kernel panics on the corrupted block (--panic-on-corruption).
        assert "dm-verity" in console or "verity" in console.lower(), console[-4000:]
    finally:
        guest.stop()
