"""The channel between TDs: vLLM's torch.distributed gloo traffic over a WireGuard overlay
(docs/scale-out.md, "What it does not protect"). `make test-cluster-net`; root.

Two or three network namespaces on one bridge stand in for TDs on an untrusted host; tcpdump on
the bridge sees what the host sees. What this pins down:

- a gloo send/recv between ranks on the WireGuard addresses (GLOO_SOCKET_IFNAME = the WireGuard
  interface) arrives intact, and the underlay carries only UDP between the WireGuard ports: no
  TCP, and no copy of the tensor's marker (nor of its first 8 bytes);
- the control: the same exchange on the underlay addresses puts the marker on the wire (so the
  capture sees payloads and the first test can fail);
- a node whose key the cluster does not list gets no answer: its TCP connect to a listener on a
  node's WireGuard address times out, while a listed node connects.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.netns import (
    UNDERLAY_IF,
    Capture,
    Network,
    WgNode,
    capture,
    generate_private_key,
    missing_prerequisites,
    stop,
    underlay,
    wait_for_line,
    wireguard_mesh,
)

_MISSING = missing_prerequisites()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.cluster_net,
    pytest.mark.skipif(_MISSING is not None, reason=_MISSING or ""),
]

MARKER = b"TDLLM-ACTIVATION-MARKER"
REPEATS = 20_000  # 460 kB: hundreds of packets, split across segments as the MTU wants
STORE_PORT = 29500
LISTEN_PORT = 7000
RANK_TIMEOUT_S = 120.0  # torch imports slowly on a loaded 2-core machine (18 s seen)
CONNECT_TIMEOUT_S = 3.0

# One rank of the exchange vLLM's stages do between TDs: rank 0 sends a tensor, rank 1 checks
# it. argv: rank, the TCPStore's address, its port; GLOO_SOCKET_IFNAME picks the interface.
RANK = f"""
import datetime, sys
import torch
import torch.distributed as dist

rank, store, port = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group(
    "gloo", init_method=f"tcp://{{store}}:{{port}}", rank=rank, world_size=2,
    timeout=datetime.timedelta(seconds=60),
)
tensor = torch.frombuffer(bytearray({MARKER!r} * {REPEATS}), dtype=torch.uint8)
if rank == 0:
    dist.send(tensor, dst=1)
else:
    got = torch.empty_like(tensor)
    dist.recv(got, src=0)
    print("equal" if torch.equal(got, tensor) else "DIFFERENT")
dist.barrier()
dist.destroy_process_group()
"""

LISTENER = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    server.accept()[0].close()
"""

CONNECT = """
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
"""


def _node(name: str, host: int) -> WgNode:
    return WgNode(name, f"198.18.0.{host}", f"10.77.0.{host}", generate_private_key())


@pytest.fixture
def two_nodes() -> list[WgNode]:
    return [_node("a", 1), _node("b", 2)]


def _gloo_exchange(net: Network, store: str, ifname: dict[str, str]) -> float:
    """Rank 0 in node a, rank 1 in node b; the seconds it took. Fails unless the tensor arrived."""
    started = time.monotonic()
    ranks = [
        net.popen(
            net.netns(node),
            [sys.executable, "-c", RANK, str(rank), store, str(STORE_PORT)],
            env={"GLOO_SOCKET_IFNAME": ifname[node]},
        )
        for rank, node in enumerate(("a", "b"))
    ]
    outputs = [proc.communicate(timeout=RANK_TIMEOUT_S) for proc in ranks]
    for rank, (proc, (_, err)) in enumerate(zip(ranks, outputs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}: {err[-2000:]}"
    assert outputs[1][0].strip() == "equal"
    return time.monotonic() - started


def _summary(cap: Capture) -> str:
    ip = [p for p in cap.packets if p.proto is not None]
    return (
        f"{len(cap.packets)} frames, {sum(len(p.frame) for p in cap.packets)} bytes, "
        f"{sum(p.proto == 6 for p in ip)} TCP, {sum(p.proto == 17 for p in ip)} UDP, "
        f"{len(cap.packets) - len(ip)} non-IPv4"
    )


def test_gloo_tensor_crosses_wireguard_as_ciphertext(
    two_nodes: list[WgNode], tmp_path: Path
) -> None:
    with wireguard_mesh(two_nodes) as net:
        with capture(net, tmp_path / "underlay.pcap") as cap:
            took = _gloo_exchange(net, "10.77.0.1", {n: net.wg_if(n) for n in ("a", "b")})
    assert cap.dropped == 0

    assert MARKER not in cap.raw
    assert MARKER[:8] not in cap.raw  # not even a fragment of it
    wg_ends = {(n.underlay, n.listen_port) for n in two_nodes}
    for packet in cap.packets:
        if packet.ethertype == 0x0806:  # ARP: the nodes find each other's MAC
            continue
        assert packet.proto == 17, f"non-UDP frame on the underlay: {packet}"
        assert (packet.src, packet.sport) in wg_ends and (packet.dst, packet.dport) in wg_ends
    # the tensor did cross here, as WireGuard data messages (type 4): not a vacuous pass
    data = [p for p in cap.packets if p.wg_type == 4]
    assert sum(len(p.payload) for p in data) > len(MARKER) * REPEATS

    initiation = next(p for p in cap.packets if p.wg_type == 1)  # the handshake is in it too
    response = next(p for p in cap.packets if p.wg_type == 2)
    print(
        f"\nwireguard: exchange {took:.2f} s; underlay {_summary(cap)}; "
        f"{len(data)} data messages; handshake {1e3 * (response.ts - initiation.ts):.2f} ms "
        f"({initiation.src} initiated)"
    )


def test_same_exchange_without_wireguard_is_readable_on_the_wire(
    two_nodes: list[WgNode], tmp_path: Path
) -> None:
    with underlay(two_nodes) as net:
        with capture(net, tmp_path / "underlay.pcap") as cap:
            took = _gloo_exchange(net, "198.18.0.1", {"a": UNDERLAY_IF, "b": UNDERLAY_IF})
    assert cap.dropped == 0

    # the whole tensor is in the capture: an occurrence is lost only where a frame ends in it
    assert cap.raw.count(MARKER) >= REPEATS - len(cap.packets)
    assert any(p.proto == 6 and STORE_PORT in (p.sport, p.dport) for p in cap.packets)
    print(
        f"\nplain: exchange {took:.2f} s; underlay {_summary(cap)}; "
        f"marker seen {cap.raw.count(MARKER)} times"
    )


def _connect(net: Network, node: str, host: str) -> tuple[bool, float, str]:
    """A TCP connect from `node`: (connected, seconds, error)."""
    started = time.monotonic()
    proc = net.popen(
        net.netns(node),
        [sys.executable, "-c", CONNECT, host, str(LISTEN_PORT), str(CONNECT_TIMEOUT_S)],
    )
    _, err = proc.communicate(timeout=CONNECT_TIMEOUT_S + 30)
    last_line = (err.strip().splitlines() or [""])[-1]  # the exception, when it failed
    return proc.returncode == 0, time.monotonic() - started, last_line


def test_node_with_unconfigured_key_cannot_reach_cluster_ports(tmp_path: Path) -> None:
    nodes = [_node("a", 1), _node("b", 2), _node("c", 3)]
    # a and b list each other; c lists a, but a does not list c
    peers_of = {"a": ["b"], "b": ["a"], "c": ["a"]}
    with wireguard_mesh(nodes, peers_of) as net:
        listener = net.popen(
            net.netns("a"), [sys.executable, "-c", LISTENER, "10.77.0.1", str(LISTEN_PORT)]
        )
        wait_for_line(listener, "listening")
        with capture(net, tmp_path / "underlay.pcap") as cap:
            b_ok, b_took, b_err = _connect(net, "b", "10.77.0.1")
            c_ok, c_took, c_err = _connect(net, "c", "10.77.0.1")
        stop(listener)
        handshakes = {
            node: net.run(net.netns(node), ["wg", "show", net.wg_if(node), "latest-handshakes"])
            for node in ("b", "c")
        }

    assert b_ok, f"b could not connect: {b_err}"
    assert not c_ok
    assert "timed out" in c_err, c_err  # silence, not a refusal: a never answered c
    # c's handshake initiations reached a's WireGuard port, and a sent c nothing at all
    c_tries = [p for p in cap.packets if p.src == "198.18.0.3" and p.wg_type == 1]
    assert c_tries and all(p.dst == "198.18.0.1" for p in c_tries)
    assert not [p for p in cap.packets if p.dst == "198.18.0.3" and p.proto is not None]
    assert handshakes["c"].split()[1] == "0"  # c never completed a handshake with a
    assert handshakes["b"].split()[1] != "0"
    print(
        f"\nb connected in {b_took:.2f} s; c failed after {c_took:.2f} s ({c_err}); "
        f"c sent {len(c_tries)} handshake initiations, a answered none"
    )


def _cluster_config(folder: Path, address: str) -> Path:
    """The settings a node's `tdllm cluster wireguard` reads (no broker is asked: --offline)."""
    values = {
        "model": "/var/lib/tdllm/models/sealed",
        "engine": "vllm",
        "vllm_python": "/opt/tdllm/vllm-venv/bin/python",
        "attestation": "simulated",
        "broker_url": "http://192.0.2.1:1",
        "broker_public_key": "/etc/tdllm/broker.pub.pem",
        "key_id": "model/test/1",
        "cluster_address": address,
        "cluster_dir": str(folder / "run"),
    }
    path = folder / "tdllm.toml"
    path.write_text("".join(f'{k} = "{v}"\n' for k, v in values.items()))
    return path


def test_overlay_built_from_node_certificates_carries_gloo_as_ciphertext(tmp_path: Path) -> None:
    """The product's path: each node's WireGuard key is the one its node certificate names;
    `tdllm cluster wireguard` admits the peers that chain to the cluster CA (and refuses one
    the host slipped in from a lookalike CA); gloo then crosses only as WireGuard ciphertext."""
    from datetime import UTC, datetime, timedelta
    from ipaddress import ip_address

    from cryptography.hazmat.primitives.serialization import Encoding

    from tdllm_attest.cluster.ca import ClusterCa
    from tdllm_attest.cluster.identity import IssuedCertificate, NodeIdentity
    from tdllm_attest.cluster.request import parse_node_csr

    now = datetime.now(UTC) - timedelta(minutes=5)
    ca, lookalike = ClusterCa.generate(now=now), ClusterCa.generate(now=now)

    def certify(authority: ClusterCa, node: NodeIdentity) -> str:
        request = parse_node_csr(node.csr())
        issued = authority.issue(request, now=now, lifetime=timedelta(hours=1), quote_sha256="0")
        return issued.public_bytes(Encoding.PEM).decode()

    identities = {
        n: NodeIdentity.generate(ip_address(f"10.77.0.{i}")) for n, i in (("a", 1), ("b", 2))
    }
    intruder = NodeIdentity.generate(ip_address("10.77.0.9"))
    nodes = [
        WgNode(
            n,
            f"198.18.0.{i}",
            str(identities[n].address),
            base64.b64encode(identities[n].wireguard_key.private_bytes_raw()).decode(),
        )
        for n, i in (("a", 1), ("b", 2))
    ]
    tdllm = str(Path(sys.executable).parent / "tdllm")
    with wireguard_mesh(nodes, peers_of={"a": [], "b": []}) as net:
        for name, other in (("a", "b"), ("b", "a")):
            folder = tmp_path / name
            identities[name].write(
                folder / "run",
                IssuedCertificate(certify(ca, identities[name]), ca.certificate_pem()),
            )
            peers = folder / "run" / "peers"
            peers.mkdir()
            (peers / f"{other}.crt").write_text(certify(ca, identities[other]))
            (peers / "slipped-in.crt").write_text(certify(lookalike, intruder))
            endpoints = folder / "endpoints.json"
            underlay_of = {n.overlay: f"{n.underlay}:{n.listen_port}" for n in nodes}
            endpoints.write_text(json.dumps(underlay_of))
            done = subprocess.run(
                net.argv(
                    net.netns(name),
                    [
                        "env",
                        "TDLLM_ALLOW_SIMULATED_TDX=1",
                        tdllm,
                        "cluster",
                        "wireguard",
                        "--config",
                        str(_cluster_config(folder, str(identities[name].address))),
                        "--offline",
                        "--interface",
                        net.wg_if(name),
                        "--prefix-length",
                        "24",
                        "--endpoints",
                        str(endpoints),
                    ],
                ),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            assert "refused slipped-in.crt: not a node certificate of the cluster CA" in done.stderr
            assert f"admitted {identities[other].address}" in done.stdout
            listed = net.run(net.netns(name), ["wg", "show", net.wg_if(name), "peers"]).split()
            other_key = base64.b64encode(identities[other].wireguard_public).decode()
            assert listed == [other_key]  # the lookalike's node is not a peer
        with capture(net, tmp_path / "underlay.pcap") as cap:
            _gloo_exchange(net, "10.77.0.1", {n: net.wg_if(n) for n in ("a", "b")})
    assert cap.dropped == 0
    assert MARKER not in cap.raw and MARKER[:8] not in cap.raw
    assert all(p.proto == 17 for p in cap.packets if p.proto is not None)
    assert sum(len(p.payload) for p in cap.packets if p.wg_type == 4) > len(MARKER) * REPEATS
