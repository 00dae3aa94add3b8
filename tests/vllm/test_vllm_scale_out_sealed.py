"""A sealed model over two attested Ray nodes: every stage takes the key in its own TD
(docs/scale-out.md, "Every stage takes the model key in its own TD"). `make test-scale-out`;
skipped without the vLLM venv or without Ray in it.

The product path end to end, short of booting TDs: a simulated broker and quote service; each
node runs `tdllm cluster join` (its node certificate from the broker's cluster CA, after its
quote passed) and then `tdllm cluster run -- ray start --block ...`; vLLM's driver asks for
pipeline parallelism over both nodes with `--load-format tdllm-sealed`, naming a head loader
channel that does not exist, so each stage can only load with the key its own node's holder
released after a fresh quote. The answer must equal the plain model's in one process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_network
from pathlib import Path

import pytest
import requests
import torch

from tdllm.api.boot import BootDeps
from tdllm.model.bundled import bundled_model_path
from tdllm.sealing.reader import open_sealed
from tdllm.sources import open_checkpoint
from tdllm.vllm_engine.model_dir import write_model_dir
from tdllm_attest.cluster.identity import CA_CERT, NODE_CERT, NODE_KEY
from tdllm_attest.testing.provider import SimulatedProvider
from tdllm_lab.sealing.writer import seal_checkpoint
from tests.api.cluster_harness import Cluster, node_config, running_cluster
from tests.attestation.simulated_broker import TEST_KEY_ID, TEST_MODEL, TEST_VERSION, td_fields
from tests.vllm.conftest import start_service, vllm_python
from tests.vllm.ray_cluster import (
    OWN_SHM,
    NodeCredentials,
    RayCluster,
    base_env,
    host_ip,
    ray_installed,
    run_generate,
)

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,  # ~5 min: `make test-scale-out`
    pytest.mark.filterwarnings("ignore:.*SIMULATED.*"),
]

WORKER_IP = "127.0.0.2"
PROMPT = "The capital of France is"
TDLLM = str(Path(sys.executable).parent / "tdllm")
# simulated TDX for `tdllm cluster run`; the tdllm plugin's CPU-cluster changes in each vLLM process
NODE_ENV = {"TDLLM_ALLOW_SIMULATED_TDX": "1", "TDLLM_VLLM_RAY_ON_CPU": "1"}


def _credentials(config: Path) -> NodeCredentials:
    run = config.parent / "run"
    return NodeCredentials(run / NODE_CERT, run / NODE_KEY, run / CA_CERT)


def _join(config: Path) -> NodeCredentials:
    done = subprocess.run(
        [TDLLM, "cluster", "join", "--config", str(config)],
        env=os.environ | NODE_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return _credentials(config)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    head = host_ip()
    networks = (ip_network(f"{head}/32"), ip_network(f"{WORKER_IP}/32"))
    yield from running_cluster(tmp_path_factory.mktemp("broker"), networks=networks)


@dataclass
class Nodes:
    """Two joined nodes running `tdllm cluster run -- ray start`, and what the tests share."""

    python: Path
    work: Path
    env: dict[str, str]  # vLLM's, without Ray's TLS settings
    cluster: RayCluster
    creds: dict[str, NodeCredentials]
    sealed: Path
    loader: dict[str, object]  # --model-loader-extra-config for the sealed model
    alone: dict[str, object]  # the plain model's greedy answer in one process

    def logs(self) -> dict[str, str]:
        return {node.ip: node.log.read_text() for node in self.cluster.nodes}

    def driver_env(self) -> dict[str, str]:
        """What the head's vLLM driver gets: Ray's address and TLS (the head's certificate)."""
        head = self.cluster.head_ip
        return self.creds[head].env() | {"RAY_ADDRESS": self.cluster.address, "VLLM_HOST_IP": head}


@pytest.fixture(scope="module")
def nodes(broker: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    python = vllm_python()
    if not ray_installed(python):
        pytest.skip(f"no Ray in {python}: `make vllm` installs the pins with Ray")
    work = tmp_path_factory.mktemp("sealed-scale-out")
    model_dir = write_model_dir(open_checkpoint("bundled"), work / "model")
    sealed = work / "sealed"
    key = broker.deployment.data_keys[TEST_KEY_ID]
    seal_checkpoint(
        open_checkpoint("bundled"),
        sealed,
        data_key=key,
        key_id=TEST_KEY_ID,
        model_name=TEST_MODEL,
        model_version=TEST_VERSION,
        dtype=torch.bfloat16,
    )
    identity = open_sealed(sealed, data_key=key).identity
    assert identity is not None
    env = base_env(python, work) | {
        "TDLLM_TEST_MODEL_DIR": str(model_dir),
        "TDLLM_TEST_SOURCE": str(bundled_model_path()),  # vLLM's venv has no bundled package
        "TDLLM_TEST_PROMPT": PROMPT,
        "RAY_DEDUP_LOGS": "0",
    }
    alone, alone_output = run_generate(python, work, env, backend="mp", pp=1, eager=True)
    assert alone is not None, alone_output[-4000:]
    loader: dict[str, object] = {
        "source": str(sealed),
        "channel": str(work / "no-such-head-channel.sock"),  # a stage may not need it
        "model_id": identity["model_id"],
        "manifest_sha256": identity["manifest_sha256"],
        "model": TEST_MODEL,
        "version": TEST_VERSION,
    }
    cluster = RayCluster(python, work, env)
    head = cluster.head_ip
    configs = {
        ip: node_config(broker, work / name, ip, model=sealed)
        for name, ip in (("head", head), ("worker", WORKER_IP))
    }
    creds = {ip: _join(config) for ip, config in configs.items()}
    try:
        for ip, config in configs.items():
            shm = OWN_SHM if ip == WORKER_IP else ()
            under = (*shm, TDLLM, "cluster", "run", "--config", str(config), "--")
            cluster.start_node(ip, creds[ip], head=ip == head, under=under, env=NODE_ENV)
        assert cluster.wait_for_nodes(creds[head], [head, WORKER_IP]) == sorted([head, WORKER_IP])
        yield Nodes(python, work, env, cluster, creds, sealed, loader, alone)
    finally:
        cluster.stop()
    for path in work.rglob("*"):  # the key in no file, raw or hex
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert key not in data and key.hex().encode() not in data, path


def _stage_loads(log: str) -> int:
    return len(re.findall(r"stage pid \d+: loaded \d+ tensors", log))


def test_pipeline_stages_on_two_attested_nodes_load_the_sealed_model_with_their_own_keys(
    nodes: Nodes,
) -> None:
    before = {ip: _stage_loads(log) for ip, log in nodes.logs().items()}
    driver = (
        nodes.env
        | nodes.driver_env()
        | {
            "TDLLM_TEST_LOAD_FORMAT": "tdllm-sealed",
            "TDLLM_TEST_LOADER_CONFIG": json.dumps(nodes.loader),
        }
    )
    spread, output = run_generate(
        nodes.python, nodes.work, driver, backend="ray", pp=2, eager=False
    )
    logs = nodes.logs()
    assert spread is not None, output[-4000:] + "".join(t[-2000:] for t in logs.values())
    print(f"one process, plain: {nodes.alone}\nPP=2 sealed over two attested nodes: {spread}")
    assert spread["token_ids"] == nodes.alone["token_ids"]
    assert "PP rank 0" in output and "PP rank 1" in output
    for ip, log in logs.items():  # one stage per node, each with its own node's released key
        assert _stage_loads(log) == before[ip] + 1, (ip, log[-3000:])


def test_the_heads_service_serves_the_sealed_model_over_both_nodes(
    nodes: Nodes, broker: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The appliance's path: the head's service attests, verifies the sealed manifest and starts
    vLLM with Ray (its environment as the unit's EnvironmentFile gives it); the stages take
    their keys from their nodes; the answer comes through the service's OpenAI API."""
    for name, value in nodes.driver_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TDLLM_VLLM_RAY_ON_CPU", "1")  # the plugin's one-line change, in the driver
    before = {ip: _stage_loads(log) for ip, log in nodes.logs().items()}
    deps = BootDeps(
        quote_provider=SimulatedProvider(broker.deployment.platform, td_fields()),
        collateral=lambda _quote: broker.deployment.platform.collateral_json(),
    )
    settings = {
        "model": str(nodes.sealed),
        "attestation": "simulated",
        "allow_simulated": True,
        "broker_url": broker.broker_url,
        "broker_public_key": str(broker.pinned),
        "key_id": TEST_KEY_ID,
        "vllm_args": ("--distributed-executor-backend=ray", "--pipeline-parallel-size=2"),
        "max_batch": 2,
        "context_tokens": 512,
        "max_prompt_tokens": 256,
    }
    running = start_service(settings, deps)
    try:
        served = requests.get(f"{running.url}/v1/models", timeout=30).json()["data"][0]["id"]
        answer = requests.post(
            f"{running.url}/v1/completions",
            json={"model": served, "prompt": PROMPT, "max_tokens": 30, "temperature": 0},
            timeout=120,
        )
    finally:
        running.stop()
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == nodes.alone["text"]
    for ip, log in nodes.logs().items():
        assert _stage_loads(log) == before[ip] + 1, (ip, log[-3000:])
