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
from ipaddress import ip_network
from pathlib import Path

import pytest

from tdllm.model.bundled import bundled_model_path
from tdllm.sealing.reader import open_sealed
from tdllm.sources import open_checkpoint
from tdllm.vllm_engine.model_dir import write_model_dir
from tdllm_attest.cluster.identity import CA_CERT, NODE_CERT, NODE_KEY
from tdllm_lab.sealing.writer import seal_checkpoint
from tests.api.cluster_harness import Cluster, node_config, running_cluster
from tests.attestation.simulated_broker import TEST_KEY_ID, TEST_MODEL, TEST_VERSION
from tests.vllm.conftest import vllm_python
from tests.vllm.ray_cluster import (
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
SIMULATED = {"TDLLM_ALLOW_SIMULATED_TDX": "1"}


def _credentials(config: Path) -> NodeCredentials:
    run = config.parent / "run"
    return NodeCredentials(run / NODE_CERT, run / NODE_KEY, run / CA_CERT)


def _join(config: Path) -> NodeCredentials:
    done = subprocess.run(
        [TDLLM, "cluster", "join", "--config", str(config)],
        env=os.environ | SIMULATED,
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


def test_pipeline_stages_on_two_attested_nodes_load_the_sealed_model_with_their_own_keys(
    broker: Cluster, tmp_path: Path
) -> None:
    python = vllm_python()
    if not ray_installed(python):
        pytest.skip(f"no Ray in {python}: `make vllm` installs the pins with Ray")
    bundled = open_checkpoint("bundled")
    model_dir = write_model_dir(bundled, tmp_path / "model")
    sealed = tmp_path / "sealed"
    seal_checkpoint(
        open_checkpoint("bundled"),
        sealed,
        data_key=broker.deployment.data_keys[TEST_KEY_ID],
        key_id=TEST_KEY_ID,
        model_name=TEST_MODEL,
        model_version=TEST_VERSION,
    )
    identity = open_sealed(sealed, data_key=broker.deployment.data_keys[TEST_KEY_ID]).identity
    assert identity is not None
    env = base_env(python, tmp_path) | {
        "TDLLM_TEST_MODEL_DIR": str(model_dir),
        "TDLLM_TEST_SOURCE": str(bundled_model_path()),  # vLLM's venv has no bundled package
        "TDLLM_TEST_PROMPT": PROMPT,
        "RAY_DEDUP_LOGS": "0",
    }
    alone, alone_output = run_generate(python, tmp_path, env, backend="mp", pp=1, eager=True)
    assert alone is not None, alone_output[-4000:]

    cluster = RayCluster(python, tmp_path, env)
    head = cluster.head_ip
    configs = {
        ip: node_config(broker, tmp_path / name, ip, model=sealed)
        for name, ip in (("head", head), ("worker", WORKER_IP))
    }
    creds = {ip: _join(config) for ip, config in configs.items()}
    try:
        for ip, config in configs.items():
            under = (TDLLM, "cluster", "run", "--config", str(config), "--")
            cluster.start_node(ip, creds[ip], head=ip == head, under=under, env=SIMULATED)
        assert cluster.wait_for_nodes(creds[head], [head, WORKER_IP]) == sorted([head, WORKER_IP])
        loader = {
            "source": str(sealed),
            "channel": str(tmp_path / "no-such-head-channel.sock"),  # a stage may not need it
            "model_id": identity["model_id"],
            "manifest_sha256": identity["manifest_sha256"],
            "model": TEST_MODEL,
            "version": TEST_VERSION,
        }
        driver = (
            env
            | creds[head].env()
            | {
                "RAY_ADDRESS": cluster.address,
                "VLLM_HOST_IP": head,
                "TDLLM_TEST_LOAD_FORMAT": "tdllm-sealed",
                "TDLLM_TEST_LOADER_CONFIG": json.dumps(loader),
            }
        )
        spread, output = run_generate(python, tmp_path, driver, backend="ray", pp=2, eager=False)
        logs = {node.ip: node.log.read_text() for node in cluster.nodes}
    finally:
        cluster.stop()
    assert spread is not None, output[-4000:] + "".join(t[-2000:] for t in logs.values())
    print(f"one process, plain: {alone}\nPP=2 sealed over two attested nodes: {spread}")
    assert spread["token_ids"] == alone["token_ids"]
    assert "PP rank 0" in output and "PP rank 1" in output
    for ip, log in logs.items():  # one stage per node, each with its own node's released key
        assert len(re.findall(r"stage pid \d+: loaded \d+ tensors", log)) == 1, (ip, log[-3000:])
    key = broker.deployment.data_keys[TEST_KEY_ID]
    for path in tmp_path.rglob("*"):  # the key in no file, raw or hex
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert key not in data and key.hex().encode() not in data, path
