"""The smoke image boots under TCG, attests, unseals and serves a completion; one flipped root
byte stops it.

The host side of the attested boot runs in this process, on loopback: the UNSAFE simulated
quote service (the QGS's role on TDX) and the key broker, which trusts exactly that simulated
platform and holds the data key of the bundled SmolLM2, sealed here onto a models disk. The
guest reaches both only through QEMU guestfwd at the addresses image/profiles/smoke.yml names.

Slow (a build of several minutes, then TCG boots): `make test-image`. Set TDLLM_SMOKE_IMAGE to
an artefact directory from `make image IMAGE_PROFILE=smoke` to skip the build.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml  # type: ignore[import-untyped]
from werkzeug.serving import BaseWSGIServer, make_server

from tdllm.sources import open_checkpoint
from tdllm_attest.broker.app import create_app as create_broker
from tdllm_attest.client import new_nonce, verify_attestation
from tdllm_attest.testing.qgs import create_qgs_app
from tdllm_attest.trust import select_trust_anchor
from tdllm_lab.sealing.writer import seal_checkpoint
from tests.attestation.simulated_broker import (
    POLICY_NAME,
    SIM_NOW,
    SIMULATED_ENV,
    SimulatedDeployment,
    simulated_deployment,
    td_fields,
)
from tests.image.conftest import REPO, require_root_build_tools
from tests.image.images import (
    PREBUILT_ENV,
    Guest,
    boot,
    build,
    flip_byte_in_file,
    models_disk,
)
from tests.image.smoke_keys import SMOKE_MODEL, SMOKE_MODEL_VERSION, smoke_broker_key

# A build, a TCG boot (~6 min to /ready here) and a prompt through torch under TCG.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

HEALTH_TIMEOUT_S = 1200  # from QEMU start; TCG is 10-50x slower than a CPU
TAMPERED_WAIT_S = 420
# Read at every start of the service: its entry point script.
TAMPER_TARGET = "/opt/tdllm/venv/bin/tdllm"
SMOKE = yaml.safe_load((REPO / "image/profiles/smoke.yml").read_text())
SERVICE = SMOKE["tdllm_service_settings"]
SERVICE_GID = 990  # tdllm_service_uid in ansible/roles/tdllm_service/defaults


def _guest_address(url: str) -> str:
    return url.removeprefix("http://")  # "10.0.2.100:8080"


@dataclass
class HostSide:
    deployment: SimulatedDeployment
    models: Path
    servers: list[BaseWSGIServer]

    def forwards(self) -> dict[str, int]:
        broker, qgs = self.servers
        return {
            _guest_address(SERVICE["broker_url"]): broker.server_port,
            _guest_address(SERVICE["simulated_quote_url"]): qgs.server_port,
        }


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostSide]:
    """Broker + simulated quote service on loopback, and the sealed bundled model's disk. The
    broker signs with the UNSAFE key the smoke profile pins; its record and the sealed manifest
    name the same model and version."""
    require_root_build_tools()
    folder = tmp_path_factory.mktemp("host")
    deployment = simulated_deployment()
    settings = dataclasses.replace(deployment.settings, signing_key=smoke_broker_key())
    deployment = dataclasses.replace(deployment, settings=settings)
    data_key = secrets.token_bytes(32)
    identity = {"model": SMOKE_MODEL, "version": SMOKE_MODEL_VERSION}
    settings.keystore.wrap(SERVICE["key_id"], POLICY_NAME, {"simulated"}, data_key, **identity)
    sealed = folder / "sealed"
    seal_checkpoint(
        open_checkpoint("bundled"),
        sealed,
        data_key=data_key,
        key_id=SERVICE["key_id"],
        model_name=SMOKE_MODEL,
        model_version=SMOKE_MODEL_VERSION,
    )
    disk = models_disk(sealed, folder / "models.img", SERVICE_GID)
    shutil.rmtree(sealed)
    apps: list[Any] = [
        create_broker(deployment.settings),
        create_qgs_app(deployment.platform, td_fields()),
    ]
    servers = [make_server("127.0.0.1", 0, app, threaded=True) for app in apps]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield HostSide(deployment, disk, servers)
    for server in servers:
        server.shutdown()


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


@pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
def test_smoke_image_attests_unseals_and_answers_a_completion(
    smoke_artefacts: Path, host: HostSide, tmp_path: Path
) -> None:
    root = tmp_path / "root.img"
    shutil.copyfile(smoke_artefacts / "root.img", root)
    guest = boot(
        smoke_artefacts,
        root,
        tmp_path,
        models_disk=host.models,
        guest_to_host=host.forwards(),
    )
    try:
        healthy_after = wait_for(guest, "/health", HEALTH_TIMEOUT_S)
        assert healthy_after is not None, guest.console_text()[-4000:]
        # /health is liveness; the model loads after it (/ready).
        ready_after = wait_for(guest, "/ready", HEALTH_TIMEOUT_S)
        assert ready_after is not None, guest.console_text()[-4000:]
        print(
            f"TCG boot: /health 200 after {healthy_after:.0f} s, /ready after {ready_after:.0f} s"
        )
        # /ready means the broker released the key to the guest's quote: the model is unsealed
        # in guest memory. A client checks the same platform's quote, bound to its nonce.
        anchor = select_trust_anchor(
            "simulated", simulated_root_der=host.deployment.platform.root_der, environ=SIMULATED_ENV
        )
        nonce = new_nonce()
        doc = requests.get(
            f"http://127.0.0.1:{guest.port}/v1/attestation", params={"nonce": nonce}, timeout=600
        ).json()
        # the same reference values the broker released the key against
        policy = host.deployment.settings.policies[POLICY_NAME]
        attested = verify_attestation(doc, nonce, anchor, now=SIM_NOW, policy=policy)
        assert attested.simulated and attested.policy_name == POLICY_NAME
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
