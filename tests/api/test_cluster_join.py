"""`tdllm cluster join` and `tdllm cluster wireguard` against a simulated broker on loopback HTTP,
quotes from the host's simulated quote service (what a worker TD's unit runs, with settings only).

Attacks first: a key whose policy certifies no nodes (join fails, nothing written); a peer
certificate from a lookalike CA dropped into the peers folder by the host (refused, not in the
overlay); an endpoint file smuggling configuration lines (refused whole).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network
from pathlib import Path

import pytest

from tdllm.api.app import create_app
from tdllm.api.boot import BootDeps
from tdllm.cli import main
from tdllm.settings import Settings, SettingsError
from tdllm_attest.cluster.ca import ClusterCa
from tdllm_attest.cluster.identity import NodeIdentity
from tdllm_attest.cluster.request import parse_node_csr
from tdllm_attest.testing.provider import SimulatedProvider
from tests.api.cluster_harness import Cluster, node_config, running_cluster
from tests.attestation.simulated_broker import TEST_KEY_ID, td_fields

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    yield from running_cluster(tmp_path)


Run = Callable[[list[str]], tuple[int, str, str]]


@pytest.fixture
def tdllm(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """`tdllm ARGS` as a TD's unit runs it: (exit code, stdout, stderr)."""
    monkeypatch.setenv("TDLLM_ALLOW_SIMULATED_TDX", "1")

    def run(args: list[str]) -> tuple[int, str, str]:
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _join_all(cluster: Cluster, tmp_path: Path, tdllm: Run) -> dict[int, Path]:
    """Nodes 10.77.0.1-3 joined; their settings files."""
    configs = {n: node_config(cluster, tmp_path / f"node{n}", f"10.77.0.{n}") for n in (1, 2, 3)}
    for config in configs.values():
        code, out, err = tdllm(["cluster", "join", "--config", str(config)])
        assert code == 0, err
        assert "joined as 10.77.0." in out
    return configs


def test_a_worker_joins_and_admits_the_nodes_the_broker_certified(
    cluster: Cluster, tmp_path: Path, tdllm: Run
) -> None:
    configs = _join_all(cluster, tmp_path, tdllm)
    # no files copied anywhere: node 1 finds the others in the broker's roster
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps({"10.77.0.2": "198.18.0.2:51820"}))
    code, out, err = tdllm(
        [
            "cluster",
            "wireguard",
            "--config",
            str(configs[1]),
            "--dry-run",
            "--endpoints",
            str(endpoints),
        ]
    )
    assert code == 0, err
    assert "admitted 10.77.0.2" in out and "admitted 10.77.0.3" in out
    assert "admitted 10.77.0.1" not in out  # itself
    assert out.count("[Peer]") == 2 and "Endpoint = 198.18.0.2:51820" in out
    assert "PrivateKey" not in out  # a dry run prints no secret


def test_offline_the_overlay_takes_the_peers_folder_only(
    cluster: Cluster, tmp_path: Path, tdllm: Run
) -> None:
    configs = _join_all(cluster, tmp_path, tdllm)
    peers = tmp_path / "node1" / "run" / "peers"
    peers.mkdir()
    issued = tmp_path / "node2" / "run" / "node.crt"
    (peers / "node2.crt").write_bytes(issued.read_bytes())
    args = ["cluster", "wireguard", "--config", str(configs[1]), "--dry-run", "--offline"]
    code, out, err = tdllm(args)
    assert code == 0, err
    assert "admitted 10.77.0.2" in out and "10.77.0.3" not in out


def test_an_unreachable_broker_leaves_the_overlay_unchanged(
    cluster: Cluster, tmp_path: Path, tdllm: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = node_config(cluster, tmp_path / "node", "10.77.0.1")
    assert tdllm(["cluster", "join", "--config", str(config)])[0] == 0
    from tdllm_lab.local_service import free_port

    monkeypatch.setenv("TDLLM_BROKER_URL", f"http://127.0.0.1:{free_port()}")
    code, _out, err = tdllm(["cluster", "wireguard", "--config", str(config), "--dry-run"])
    assert code != 0 and "cannot fetch the cluster roster" in err and "unchanged" in err


def test_join_fails_clearly_when_the_keys_policy_certifies_no_nodes(
    tmp_path: Path, tdllm: Run
) -> None:
    for refusing in running_cluster(tmp_path, certify=False):
        config = node_config(refusing, tmp_path / "node", "10.77.0.2")
        code, _out, err = tdllm(["cluster", "join", "--config", str(config)])
        assert code != 0
        assert err.startswith("error: the key broker did not certify this node") and "403" in err
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / "node" / "run").exists()


def test_the_overlay_refuses_a_peer_from_a_lookalike_ca(
    cluster: Cluster, tmp_path: Path, tdllm: Run
) -> None:
    config = node_config(cluster, tmp_path / "node", "10.77.0.1")
    assert tdllm(["cluster", "join", "--config", str(config)])[0] == 0
    hosts_ca = ClusterCa.generate(now=datetime.now(UTC) - timedelta(minutes=1))
    hosts_node = NodeIdentity.generate(ip_network("10.77.0.9/32").network_address)
    forged = hosts_ca.issue(
        parse_node_csr(hosts_node.csr()),
        now=datetime.now(UTC) - timedelta(minutes=1),
        lifetime=timedelta(hours=1),
        quote_sha256="00" * 32,
    )
    peers = tmp_path / "node" / "run" / "peers"
    peers.mkdir()
    from cryptography.hazmat.primitives.serialization import Encoding

    (peers / "host.crt").write_bytes(forged.public_bytes(Encoding.PEM))
    code, out, err = tdllm(["cluster", "wireguard", "--config", str(config), "--dry-run"])
    assert code == 0
    assert "refused host.crt: not a node certificate of the cluster CA" in err
    assert "[Peer]" not in out


def test_an_endpoint_file_smuggling_configuration_is_refused_whole(
    cluster: Cluster, tmp_path: Path, tdllm: Run
) -> None:
    config = node_config(cluster, tmp_path / "node", "10.77.0.1")
    assert tdllm(["cluster", "join", "--config", str(config)])[0] == 0
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps({"10.77.0.2": "198.18.0.2:51820\nAllowedIPs = 0.0.0.0/0"}))
    code, _out, err = tdllm(
        [
            "cluster",
            "wireguard",
            "--config",
            str(config),
            "--dry-run",
            "--endpoints",
            str(endpoints),
        ]
    )
    assert code != 0 and "want IP:port" in err


def test_the_head_writes_its_node_credentials_before_vllm_starts(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The head's service takes its certificate in its own key release; here vLLM cannot start
    (no vLLM installed), which comes after the credentials are written."""
    run = tmp_path / "run"
    settings = Settings(
        model=str(tmp_path / "missing-sealed"),
        engine="vllm",
        vllm_python=str(tmp_path / "no-python"),
        attestation="simulated",
        allow_simulated=True,
        broker_url=cluster.broker_url,
        broker_public_key=str(cluster.pinned),
        key_id=TEST_KEY_ID,
        cluster_address="10.77.0.1",
        cluster_dir=str(run),
        boot_attempts=1,
    )
    deps = BootDeps(
        quote_provider=SimulatedProvider(cluster.deployment.platform, td_fields()),
        collateral=lambda _q: cluster.deployment.platform.collateral_json(),
    )
    svc = create_app(settings, boot_deps=deps).extensions["tdllm"]
    import time

    deadline = time.monotonic() + 60
    while svc.state.phase != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert svc.state.phase == "failed"  # the sealed model is not there: after the release
    assert "sealed" in svc.state.reason or "open" in svc.state.reason
    assert sorted(p.name for p in run.iterdir()) == [
        "cluster-ca.crt",
        "node.crt",
        "node.key",
        "wg.key",
    ]


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"cluster_address": "node-1"}, "cluster_address must be an IP address"),
        ({"cluster_address": "10.77.0.1", "broker_url": None}, "needs broker_url"),
        ({"cluster_address": "10.77.0.1", "engine": "tdllm"}, "needs engine 'vllm'"),
        ({"cluster_address": "10.77.0.1", "cluster_dir": "run"}, "absolute path"),
    ],
)
def test_cluster_settings_are_checked(changes: dict[str, object], problem: str) -> None:
    base: dict[str, object] = {
        "engine": "vllm",
        "vllm_python": "/x/python",
        "attestation": "simulated",
        "allow_simulated": True,
        "broker_url": "http://127.0.0.1:1",
        "broker_public_key": "/x.pem",
        "key_id": "k",
    }
    with pytest.raises(SettingsError, match=problem):
        Settings(**(base | changes))  # type: ignore[arg-type]
