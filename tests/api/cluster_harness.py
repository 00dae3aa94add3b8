"""A cluster's outside for the `tdllm cluster` tests: a simulated broker whose key policy
certifies nodes of `OVERLAY`, a quote service on loopback HTTP, and each node's settings file."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path

from werkzeug.serving import make_server

from tdllm_attest.broker.app import create_app as create_broker
from tdllm_attest.cluster.ca import ClusterCa
from tdllm_attest.cluster.policy import ClusterPolicy
from tdllm_attest.testing.qgs import create_qgs_app
from tests.attestation.simulated_broker import (
    POLICY_NAME,
    TEST_KEY_ID,
    SimulatedDeployment,
    simulated_deployment,
    td_fields,
)

OVERLAY = ip_network("10.77.0.0/24")


@dataclasses.dataclass
class Cluster:
    deployment: SimulatedDeployment
    broker_url: str
    qgs_url: str
    pinned: Path


def serve(app: object) -> tuple[str, object]:
    server = make_server("127.0.0.1", 0, app, threaded=True)  # type: ignore[arg-type]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server


def running_cluster(
    tmp: Path, *, certify: bool = True, networks: tuple[IPv4Network | IPv6Network, ...] = (OVERLAY,)
) -> Iterator[Cluster]:
    # the platform, broker and CA stand at the real time: the commands judge by the real clock
    now = datetime.now(UTC) - timedelta(minutes=1)
    dep = simulated_deployment(now=now, cluster_ca=ClusterCa.generate(now=now))
    policy = dataclasses.replace(
        dep.settings.policies[POLICY_NAME],
        cluster=ClusterPolicy(networks) if certify else None,
    )
    dep.settings = dataclasses.replace(dep.settings, policies={POLICY_NAME: policy})
    broker_url, broker = serve(create_broker(dep.settings))
    qgs_url, qgs = serve(create_qgs_app(dep.platform, td_fields()))
    try:
        yield Cluster(dep, broker_url, qgs_url, dep.write_broker_public_key(tmp))
    finally:
        broker.shutdown()  # type: ignore[attr-defined]
        qgs.shutdown()  # type: ignore[attr-defined]


def node_config(cluster: Cluster, folder: Path, address: str, model: Path | None = None) -> Path:
    """A node's settings file (`model`: its sealed copy; join never opens it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tdllm.toml"
    values = {
        "model": str(model or folder / "sealed"),
        "engine": "vllm",
        "vllm_python": "/opt/tdllm/vllm-venv/bin/python",
        "attestation": "simulated",
        "simulated_quote_url": cluster.qgs_url,
        "broker_url": cluster.broker_url,
        "broker_public_key": str(cluster.pinned),
        "key_id": TEST_KEY_ID,
        "cluster_address": address,
        "cluster_dir": str(folder / "run"),
    }
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path
