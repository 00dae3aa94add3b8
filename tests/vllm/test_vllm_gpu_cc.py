"""The gpu-cc profile end to end on the vllm engine (vLLM on the CPU here, the GPU synthetic):
the broker releases the sealed model's key only with the GPUs' evidence for its session bound
into the quote, and a client checks the same GPUs, for its own nonce, before it asks anything.

With a real confidential-computing GPU the evidence comes from NVIDIA's driver
(`tdllm_attest.gpu.collect`, the `gpu` marker); everything else is this path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import torch

from tdllm.api.boot import BootDeps
from tdllm.sources import open_checkpoint
from tdllm_attest.client import new_nonce, verify_attestation
from tdllm_attest.client.attest import anchor_for
from tdllm_attest.gpu.policy import GpuPolicy
from tdllm_attest.gpu.rim import RimStore
from tdllm_attest.testing.gpu import SyntheticGpu
from tdllm_attest.testing.provider import SimulatedProvider
from tdllm_lab.local_service import free_port
from tests.api.test_attested_boot import Broker, seal_test_model
from tests.attestation.simulated_broker import (
    POLICY_NAME,
    SIM_NOW,
    SIMULATED_ENV,
    TEST_KEY_ID,
    SimulatedDeployment,
    simulated_deployment,
    td_fields,
)
from tests.client.reference_policy import policy_for
from tests.vllm.conftest import RunningService, start_service, wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.filterwarnings("ignore:.*SIMULATED.*")]


@pytest.fixture(scope="module")
def gpu() -> SyntheticGpu:
    return SyntheticGpu(SIM_NOW)


@pytest.fixture(scope="module")
def rims(gpu: SyntheticGpu, tmp_path_factory: pytest.TempPathFactory) -> RimStore:
    folder = tmp_path_factory.mktemp("rims")
    gpu.write_rims(folder)
    return RimStore.from_directory(folder)


def _deployment(gpu: SyntheticGpu, rims: RimStore, driver: str) -> SimulatedDeployment:
    dep = simulated_deployment(gpu_rims=rims, gpu_anchors=gpu.anchors(environ=SIMULATED_ENV))
    rule = GpuPolicy(allowed_driver_versions=frozenset({driver}))
    policy = dataclasses.replace(dep.settings.policies[POLICY_NAME], gpu=rule)
    dep.settings = dataclasses.replace(dep.settings, policies={POLICY_NAME: policy})
    return dep


@pytest.fixture(scope="module")
def deployment(gpu: SyntheticGpu, rims: RimStore) -> SimulatedDeployment:
    return _deployment(gpu, rims, gpu.driver_version)


@pytest.fixture(scope="module")
def sealed(deployment: SimulatedDeployment, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sealed") / "smollm2"
    return seal_test_model(
        deployment, out, checkpoint=open_checkpoint("bundled"), dtype=torch.bfloat16
    )


@contextmanager
def _running_broker(deployment: SimulatedDeployment) -> Iterator[Broker]:
    running = Broker(deployment, free_port())
    running.start()
    yield running
    running.stop()


def _service(
    deployment: SimulatedDeployment, sealed: Path, broker: Broker, gpu: SyntheticGpu, wait: bool
) -> RunningService:
    pinned = deployment.write_broker_public_key(sealed.parent)
    deps = BootDeps(
        quote_provider=SimulatedProvider(deployment.platform, td_fields()),
        collateral=lambda _quote: deployment.platform.collateral_json(),
        gpu_evidence=lambda nonce: [gpu.collect(nonce)],
    )
    settings = {
        "model": str(sealed),
        "profile": "gpu-cc",
        "attestation": "simulated",
        "allow_simulated": True,
        "broker_url": f"http://127.0.0.1:{broker.port}",
        "broker_public_key": str(pinned),
        "key_id": TEST_KEY_ID,
        "boot_backoff_s": 0.1,
    }
    return start_service(settings, deps, wait=wait)


def test_gpu_cc_boot_gets_the_key_with_gpu_evidence_and_clients_verify_the_gpus(
    deployment: SimulatedDeployment, sealed: Path, gpu: SyntheticGpu, rims: RimStore
) -> None:
    with _running_broker(deployment) as broker:
        running = _service(deployment, sealed, broker, gpu, wait=True)
        try:
            nonce = new_nonce()
            url = running.url
            doc = requests.get(f"{url}/v1/attestation", params={"nonce": nonce}, timeout=30)
            attested = verify_attestation(
                doc.json(),
                nonce,
                anchor_for(deployment.platform.root_der, SIMULATED_ENV),
                now=SIM_NOW,
                policy=policy_for(
                    deployment.platform,
                    td_fields(),
                    gpu={"driver_versions": [gpu.driver_version], "vbios_versions": []},
                ),
                gpu_rims=rims,
                gpu_anchors=gpu.anchors(environ=SIMULATED_ENV),
            )
            assert attested.profile == "gpu-cc" and attested.gpus[0]["driver"]
            card = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]
            body = {"model": card["id"], "messages": [{"role": "user", "content": "Hi"}]}
            answer = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)
            assert answer.status_code == 200, answer.text
        finally:
            running.stop()


def test_gpu_cc_boot_fails_closed_when_the_broker_refuses_the_gpus_driver(
    gpu: SyntheticGpu, rims: RimStore, sealed: Path, deployment: SimulatedDeployment
) -> None:
    strict = _deployment(gpu, rims, "999.99.99")
    strict.settings = dataclasses.replace(strict.settings, keystore=deployment.settings.keystore)
    with _running_broker(strict) as broker:
        running = _service(strict, sealed, broker, gpu, wait=False)
        try:
            state = running.service.state
            wait_until(lambda: state.phase == "failed", 60)
            assert "403" in state.reason and "policy-refused" in state.reason
        finally:
            running.stop()
