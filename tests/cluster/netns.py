"""Nodes in network namespaces on one bridge, with a userspace WireGuard mesh over them
(tests/cluster/test_wireguard_channel.py).

Each node is a namespace `tdllm-<run>-<name>` with one veth link `eth0` (underlay, 198.18.0.0/24)
into a switch namespace holding the bridge. The switch stands in for the host: what tcpdump
sees on its bridge is what an untrusted host sees of the cluster network.

WireGuard is wireguard-go (the kernel here has no wireguard module) started inside each node's
namespace, configured with `wg set` from keys given as parameters: in the appliance each key pair
is made inside a TD and bound to its attestation by the key broker; here tests make them.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

UNDERLAY_PREFIX = 24  # 198.18.0.0/24 (RFC 2544 benchmarking space: never routed anywhere)
OVERLAY_PREFIX = 24  # 10.77.0.0/24
WG_PORT = 51820
UNDERLAY_IF = "eth0"  # each node's link to the switch (namespaces keep names apart)
BRIDGE = "br0"
TOOLS = ("ip", "wg", "wireguard-go", "tcpdump")
# wireguard-go's control sockets live here whatever the namespace: interface names must be
# unique across all namespaces, and `wg show` without a name lists every node's interface
WG_SOCKET_DIR = Path("/var/run/wireguard")
START_TIMEOUT_S = 10.0
_NAME = re.compile(r"[a-z0-9]{1,7}")  # "wg" + 6 hex + name: at most 15 (IFNAMSIZ - 1)


def missing_prerequisites() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN devices)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (`make cluster-net-tools`)"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun (wireguard-go is a TUN device)"
    return None


# ---------------------------------------------------------------- keys


def generate_private_key() -> str:
    """A WireGuard private key: 32 raw X25519 bytes, base64."""
    raw = X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode()


def public_key(private_key_b64: str) -> str:
    private = X25519PrivateKey.from_private_bytes(base64.b64decode(private_key_b64, validate=True))
    return base64.b64encode(
        private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    ).decode()


@dataclass(frozen=True)
class WgNode:
    name: str  # short: it goes into namespace and interface names
    underlay: str  # e.g. 198.18.0.1
    overlay: str  # e.g. 10.77.0.1
    private_key_b64: str
    listen_port: int = WG_PORT

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"node name {self.name!r}: 1-7 of [a-z0-9]")

    @property
    def public_key_b64(self) -> str:
        return public_key(self.private_key_b64)


# ---------------------------------------------------------------- the network


@dataclass
class Network:
    """Namespaces of one run; every process started through it is stopped at teardown."""

    run_id: str
    nodes: dict[str, WgNode]
    _procs: list[subprocess.Popen[str]] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"tdllm-{self.run_id}-sw"

    def netns(self, node: str) -> str:
        return f"tdllm-{self.run_id}-{node}"

    def wg_if(self, node: str) -> str:
        return f"wg{self.run_id}{node}"

    def argv(self, netns: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", netns, *argv]

    def run(self, netns: str, argv: Sequence[str], timeout: float = 30.0) -> str:
        done = subprocess.run(
            self.argv(netns, argv), capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {netns}: {done.stderr.strip()}")
        return done.stdout

    def popen(
        self,
        netns: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
    ) -> subprocess.Popen[str]:
        """A process in `netns`, stopped at teardown if still running. Its output comes through
        pipes, or goes to `log` for a long-lived process nobody reads (a full pipe blocks it)."""
        sink = open(log, "ab") if log else None  # closed below: the child holds its own copy
        try:
            proc = subprocess.Popen(
                self.argv(netns, argv),
                stdout=sink or subprocess.PIPE,
                stderr=sink or subprocess.PIPE,
                text=True,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # its own group: Ctrl-C on pytest does not hit it first
            )
        finally:
            if sink:
                sink.close()
        self._procs.append(proc)
        return proc

    def _add_netns(self, netns: str) -> None:
        subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True)
        self._namespaces.append(netns)
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        # no IPv6: router solicitations and MLD reports would be noise in every capture
        no_ipv6 = [f"net.ipv6.conf.{conf}.disable_ipv6=1" for conf in ("all", "default")]
        self.run(netns, ["sysctl", "-qw", *no_ipv6])

    def _teardown(self) -> None:
        for proc in reversed(self._procs):
            stop(proc)
        for netns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)
        for node in self.nodes:  # left behind only if wireguard-go was killed
            (WG_SOCKET_DIR / f"{self.wg_if(node)}.sock").unlink(missing_ok=True)


def stop(proc: subprocess.Popen[str], grace_s: float = 5.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@contextmanager
def underlay(nodes: Sequence[WgNode]) -> Iterator[Network]:
    """The nodes' namespaces on one bridge, plain IP only (no WireGuard)."""
    net = Network(run_id=secrets.token_hex(3), nodes={node.name: node for node in nodes})
    if len(net.nodes) != len(nodes):
        raise ValueError("node names must be unique")
    try:
        net._add_netns(net.switch)
        sw = ["ip", "-n", net.switch]
        # no multicast snooping: the bridge would join 224.0.0.106 and send IGMP reports of its
        # own into every capture
        subprocess.run(
            [*sw, "link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0"], check=True
        )
        subprocess.run([*sw, "link", "set", BRIDGE, "up"], check=True)
        for node in nodes:
            ns = net.netns(node.name)
            net._add_netns(ns)
            port = f"p-{node.name}"
            # made in the switch namespace, the node's end moved straight into its own: nothing
            # ever appears in the root namespace
            peer = ["peer", "name", UNDERLAY_IF, "netns", ns]
            subprocess.run([*sw, "link", "add", port, "type", "veth", *peer], check=True)
            subprocess.run([*sw, "link", "set", port, "master", BRIDGE, "up"], check=True)
            addr = f"{node.underlay}/{UNDERLAY_PREFIX}"
            subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", UNDERLAY_IF], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", UNDERLAY_IF, "up"], check=True)
        yield net
    finally:
        net._teardown()


@contextmanager
def wireguard_mesh(
    nodes: Sequence[WgNode], peers_of: Mapping[str, Sequence[str]] | None = None
) -> Iterator[Network]:
    """`underlay(nodes)` plus a wireguard-go interface in each node (Network.wg_if) holding the
    node's overlay address. `peers_of[name]`: the nodes whose public keys that node accepts
    (default: all others); each peer gets allowed-ips <its overlay>/32 and its underlay
    endpoint. Packets from a node that another does not list are dropped there, unanswered."""
    with underlay(nodes) as net, tempfile.TemporaryDirectory(prefix="tdllm-wg-") as tmp:
        keydir = Path(tmp)  # mkdtemp: 0700
        for node in nodes:
            log = keydir / f"wireguard-go-{node.name}.log"
            # -f: stays in the foreground, so stopping our process stops the interface (it
            # prints a banner saying the kernel module would do: there is none here)
            daemon = net.popen(
                net.netns(node.name), ["wireguard-go", "-f", net.wg_if(node.name)], log=log
            )
            _wait_for_interface(net, node.name, daemon, log)
        for node in nodes:
            key_file = keydir / f"{node.name}.key"
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(node.private_key_b64 + "\n")
            wg_if = net.wg_if(node.name)
            argv = ["wg", "set", wg_if, "private-key", str(key_file)]
            argv += ["listen-port", str(node.listen_port)]
            wanted = peers_of[node.name] if peers_of is not None else [n.name for n in nodes]
            for peer in (net.nodes[name] for name in wanted if name != node.name):
                argv += ["peer", peer.public_key_b64, "allowed-ips", f"{peer.overlay}/32"]
                argv += ["endpoint", f"{peer.underlay}:{peer.listen_port}"]
            ns = net.netns(node.name)
            net.run(ns, argv)
            net.run(ns, ["ip", "addr", "add", f"{node.overlay}/{OVERLAY_PREFIX}", "dev", wg_if])
            net.run(ns, ["ip", "link", "set", wg_if, "up"])
        yield net


def _wait_for_interface(net: Network, node: str, daemon: subprocess.Popen[str], log: Path) -> None:
    """wireguard-go creates the TUN device, then its control socket: poll both."""
    wg_if, ns = net.wg_if(node), net.netns(node)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        shown = subprocess.run(["ip", "-n", ns, "link", "show", wg_if], capture_output=True)
        if shown.returncode == 0 and (WG_SOCKET_DIR / f"{wg_if}.sock").is_socket():
            return
        if daemon.poll() is not None:
            raise RuntimeError(f"wireguard-go {wg_if} exited: {log.read_text().strip()}")
        time.sleep(0.05)
    raise TimeoutError(f"wireguard-go made no {wg_if} in {ns} within {START_TIMEOUT_S:.0f} s")


def wait_for_line(
    proc: subprocess.Popen[str], text: str, stream: Literal["stdout", "stderr"] = "stdout"
) -> str:
    """Read `proc`'s output until it holds `text` (a readiness message); what it said so far.
    Raw reads from the pipe: nothing waits unseen in a text buffer that select() cannot see."""
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    assert pipe is not None
    said = b""
    deadline = time.monotonic() + START_TIMEOUT_S
    while text.encode() not in said:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([pipe], [], [], left)[0]:
            raise TimeoutError(f"{proc.args!r} never said {text!r}; said {said!r}")
        chunk = os.read(pipe.fileno(), 4096)
        if not chunk:
            raise RuntimeError(f"{proc.args!r} exited before saying {text!r}; said {said!r}")
        said += chunk
    return said.decode(errors="replace")


# ---------------------------------------------------------------- capture


@dataclass(frozen=True)
class Packet:
    """One Ethernet frame on the underlay; IPv4 fields when it is IPv4."""

    ts: float
    frame: bytes = field(repr=False)
    ethertype: int
    proto: int | None = None  # 6 TCP, 17 UDP
    src: str = ""
    dst: str = ""
    sport: int | None = None
    dport: int | None = None
    payload: bytes = field(default=b"", repr=False)  # the TCP/UDP payload

    @property
    def wg_type(self) -> int | None:
        """WireGuard message type (1 initiation, 2 response, 3 cookie, 4 data) for UDP."""
        return self.payload[0] if self.proto == 17 and self.payload else None


@dataclass
class Capture:
    path: Path
    raw: bytes = b""  # the whole pcap file: a marker search over it misses nothing
    packets: list[Packet] = field(default_factory=list)
    dropped: int | None = None  # by the kernel, as tcpdump reports it


# A frame of the IEEE "local experimental" ethertype that capture() sends on the bridge to mark
# the end: tcpdump stops at once on SIGINT, and whatever it had not read from its ring yet is
# lost without counting as dropped (seen here: half a 460 kB exchange missing from the file)
END_ETHERTYPE = 0x88B5
SEND_END = """
import socket, sys
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind((sys.argv[1], 0))
sock.send(bytes.fromhex("020000000000020000000001" "88b5") + sys.argv[2].encode().ljust(46))
"""


@contextmanager
def capture(net: Network, path: Path) -> Iterator[Capture]:
    """tcpdump on the switch's bridge (promiscuous: it sees frames between any two nodes), full
    snap length. The Capture is filled in when the block ends, once an end frame has reached
    the file: tcpdump gets frames from its ring in order, so every frame before it is there."""
    # -U: each packet goes to the file as tcpdump reads it. No --immediate-mode: with it, tcpdump
    # dropped 66-132 of some 600 frames here (its ring then holds full-snap-length slots)
    opts = ["-n", "-s", "0", "-U", "-B", "16384"]
    proc = net.popen(net.switch, ["tcpdump", "-Z", "root", "-i", BRIDGE, "-w", str(path), *opts])
    result = Capture(path)
    wait_for_line(proc, "listening on", stream="stderr")  # printed once the capture is active
    try:
        yield result
        end = f"tdllm-capture-end-{secrets.token_hex(8)}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while end.encode() not in path.read_bytes():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the end frame never reached {path}")
            net.run(net.switch, [sys.executable, "-c", SEND_END, BRIDGE, end])
            settle = time.monotonic() + 1.0  # poll before sending another
            while end.encode() not in path.read_bytes() and time.monotonic() < settle:
                time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGINT)  # tcpdump flushes and prints its counts
        _, err = proc.communicate(timeout=10)
        found = re.search(r"(\d+) packets? dropped by kernel", err)
        result.dropped = int(found.group(1)) if found else None
    result.raw = path.read_bytes()
    result.packets = [p for p in read_pcap(result.raw) if p.ethertype != END_ETHERTYPE]


def read_pcap(raw: bytes) -> list[Packet]:
    """The classic pcap format with Ethernet frames (what `tcpdump -w` writes)."""
    magic = raw[:4]
    order = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">"}.get(magic)
    nano = {b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}.get(magic)
    endian = order or nano
    if endian is None:
        raise ValueError(f"not a pcap file: magic {magic.hex()}")
    (linktype,) = struct.unpack_from(endian + "I", raw, 20)
    if linktype != 1:
        raise ValueError(f"link type {linktype}, expected Ethernet (1)")
    scale = 1e-9 if nano else 1e-6
    packets, at = [], 24
    while at + 16 <= len(raw):
        sec, frac, caplen, _ = struct.unpack_from(endian + "IIII", raw, at)
        frame = raw[at + 16 : at + 16 + caplen]
        packets.append(_parse_frame(sec + frac * scale, frame))
        at += 16 + caplen
    return packets


def _parse_frame(ts: float, frame: bytes) -> Packet:
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    if ethertype != 0x0800:
        return Packet(ts, frame, ethertype)
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    (total,) = struct.unpack_from("!H", ip, 2)
    proto = ip[9]
    src, dst = ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20]))
    l4 = ip[ihl:total] if total else ip[ihl:]  # 0 in GSO frames over 64 KiB (BIG TCP)
    if proto not in (6, 17):
        return Packet(ts, frame, ethertype, proto, src, dst)
    sport, dport = struct.unpack_from("!HH", l4)
    header = ((l4[12] >> 4) * 4) if proto == 6 else 8
    return Packet(ts, frame, ethertype, proto, src, dst, sport, dport, l4[header:])
