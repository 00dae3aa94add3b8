"""`tdllm cluster`: a TD joins a multi-TD vLLM cluster (docs/scale-out.md).

`join` attests to the key broker and writes the node certificate and keys it got for this TD;
`run` starts the TD's Ray node and gives the model key to the vLLM stages that load in it;
`wireguard` admits the peers whose certificates chain to the cluster CA into the overlay that
carries every byte between TDs (Ray, gloo, vLLM's store). Both run in the TD as root from the
image's units, before the Ray node starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

import click

from tdllm.errors import UsageError

CONFIG = click.Path(path_type=Path, dir_okay=False, exists=True)
PEERS_DIR = "peers"
WG_CONFIG = "wg.conf"
STAGE_KEYS_SOCKET = "stage-keys.sock"  # in cluster_dir (0700, the TD's memory)
INTERFACE_NAME = re.compile(r"[A-Za-z0-9_-]{1,15}")
MAX_ROSTER = 4096  # certificates in one roster answer
MAX_PEM = 16_384


def _settings(config_file: Path | None) -> Any:
    from tdllm.settings import load_settings

    settings = load_settings(config_file)
    if settings.cluster_address is None:
        raise UsageError("this TD is no cluster node: set cluster_address (docs/scale-out.md)")
    return settings


@click.group()
def cluster() -> None:
    """Join a multi-TD vLLM cluster: node certificate, stage keys, WireGuard overlay."""


def _key_client(settings: Any) -> Any:
    """A key client for this TD: its quote provider, the pinned broker key, the real clock."""
    from tdllm.api.boot import BrokerTransport
    from tdllm.api.evidence_sources import quote_provider_for
    from tdllm_attest.broker.client import KeyClient
    from tdllm_attest.broker.signing import load_broker_public_key

    provider, _simulated = quote_provider_for(settings)
    try:
        broker_key = load_broker_public_key(Path(settings.broker_public_key).read_bytes())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the pinned broker public key: {exc}") from None
    return KeyClient(
        transport=BrokerTransport(settings.broker_url or ""),
        provider=provider,
        broker_key=broker_key,
        now=lambda: datetime.now(UTC),
    )


@cluster.command()
@click.option("--config", "config_file", type=CONFIG, default=None, help="TOML settings file")
def join(config_file: Path | None) -> None:
    """Attest to the key broker; write this node's certificate and keys to cluster_dir.

    The same exchange releases the model key; it is wiped at once (`tdllm cluster run` takes
    it afresh for each vLLM stage that loads on this node).
    """
    from tdllm.api.evidence_sources import cluster_node
    from tdllm.sealing.keys import wipe
    from tdllm_attest.broker.client import KeyReleaseError
    from tdllm_attest.errors import AttestationError

    settings = _settings(config_file)
    client = _key_client(settings)
    node = cluster_node(settings)
    if node is None:  # _settings demanded an address
        raise UsageError("no cluster_address")
    try:
        release = client.fetch_release(settings.key_id or "", node=node)
    except KeyReleaseError as exc:
        raise UsageError(f"the key broker did not certify this node: {exc}") from None
    except AttestationError as exc:
        raise UsageError(f"cannot attest: {exc}") from None
    wipe(release.key)
    directory = Path(settings.cluster_dir)
    try:
        node.write(directory, release.cluster)
    except OSError as exc:
        raise UsageError(f"cannot write the node certificate to {directory}: {exc}") from None
    click.echo(f"joined as {node.address}: node certificate and keys in {directory}")


@cluster.command(context_settings={"ignore_unknown_options": True})
@click.option("--config", "config_file", type=CONFIG, default=None, help="TOML settings file")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(config_file: Path | None, command: tuple[str, ...]) -> None:
    """Run this TD's Ray node (COMMAND, e.g. `-- ray start --block ...`) and give the model key
    to the vLLM stages that load in it, attesting afresh for each (docs/scale-out.md).

    Exits with COMMAND's exit code; SIGTERM and SIGINT are passed on to it.
    """
    from tdllm.vllm_engine.loader_channel import NODE_KEY_CHANNEL_ENV
    from tdllm.vllm_engine.stage_keys import StageKeyServer

    settings = _settings(config_file)
    directory = Path(settings.cluster_dir)
    if not directory.is_dir():
        raise UsageError(f"{directory} is not there: run `tdllm cluster join` first")
    release = _stage_release(settings, _key_client(settings))
    server = StageKeyServer(directory / STAGE_KEYS_SOCKET, release, _report_stage_load)
    # The handlers go in before the socket exists: a SIGTERM between the two used to kill this
    # process by default, leaving the socket (and, after Popen, an orphaned Ray node) behind.
    child: subprocess.Popen[bytes] | None = None
    early: list[int] = []  # signals that came before the child did

    def forward(sig: int, _frame: object) -> None:
        if child is None:
            early.append(sig)
        else:
            child.send_signal(sig)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    try:
        server.start()
    except OSError as exc:
        raise UsageError(f"cannot listen on {server.path}: {exc.strerror}") from None
    if early:  # stopped before anything ran
        server.close()
        raise SystemExit(128 + early[0])
    env = os.environ | {NODE_KEY_CHANNEL_ENV: str(server.path)}
    try:
        child = subprocess.Popen(command, env=env)  # noqa: S603  # the unit's own command line
    except OSError as exc:
        server.close()
        raise UsageError(f"cannot run {command[0]}: {exc.strerror}") from None
    if early:  # came while the child was starting: it gets it now
        child.send_signal(early[0])
    server.watch(child.pid)
    try:
        code = child.wait()
    finally:
        server.close()
    click.echo(
        f"{command[0]} exited ({code}); {len(server.loads)} stage load(s), "
        f"{server.refused} connection(s) refused",
        err=True,
    )
    raise SystemExit(128 - code if code < 0 else code)  # killed by a signal: as a shell says


def _stage_release(settings: Any, client: Any) -> Any:
    from tdllm.vllm_engine.stage_keys import StageKeyRefused
    from tdllm_attest.broker.client import KeyReleaseError
    from tdllm_attest.errors import AttestationError

    def release() -> bytearray:
        try:
            return client.fetch_release(settings.key_id or "").key  # type: ignore[no-any-return]
        except KeyReleaseError as exc:
            raise StageKeyRefused(f"the key broker refused: {exc}") from None
        except AttestationError as exc:
            raise StageKeyRefused(f"cannot attest: {exc}") from None

    return release


def _report_stage_load(load: Any) -> None:
    outcome = load.outcome
    if "loaded" in outcome:
        what = f"loaded {outcome['loaded']} tensors"
    else:
        why = outcome.get("refused") or outcome.get("failed") or "no outcome"
        what = "no key: " + str(why) if "refused" in outcome else f"load failed: {why}"
    text = "".join(c if c.isprintable() else "?" for c in what)[:300]
    click.echo(f"stage pid {load.pid}: {text}", err=True)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror} (run `tdllm cluster join`)") from None


def _endpoints(path: Path | None) -> dict[IPv4Address | IPv6Address, str]:
    from tdllm_attest.cluster.peers import parse_endpoints
    from tdllm_attest.errors import ClusterCertificateError

    if path is None:
        return {}
    try:
        doc = json.loads(_read(path))
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        return parse_endpoints({str(k): str(v) for k, v in doc.items()})
    except (ValueError, ClusterCertificateError) as exc:
        raise UsageError(f"{path}: want {{overlay address: 'IP:port'}} ({exc})") from None


def _roster(settings: Any) -> dict[str, bytes]:
    """The node certificates the broker issued under our key (GET /v1/cluster/nodes): public
    data, each checked against the cluster CA like any other; the host can only withhold it."""
    import requests

    from tdllm_attest.broker.protocol import PATH_CLUSTER_NODES

    url = (settings.broker_url or "").rstrip("/") + PATH_CLUSTER_NODES
    try:
        resp = requests.get(url, params={"key_id": settings.key_id}, timeout=30)
        doc = resp.json() if resp.status_code == 200 else None
    except (requests.RequestException, ValueError) as exc:
        raise UsageError(
            f"cannot fetch the cluster roster from the broker ({type(exc).__name__}); "
            "the overlay is unchanged"
        ) from None
    pems = doc.get("certificates") if isinstance(doc, dict) else None
    if (
        not isinstance(pems, list)
        or len(pems) > MAX_ROSTER
        or not all(isinstance(p, str) and len(p) < MAX_PEM for p in pems)
    ):
        raise UsageError(
            f"the broker's cluster roster is not a list of certificates (HTTP {resp.status_code}); "
            "the overlay is unchanged"
        )
    return {f"broker#{i}": pem.encode() for i, pem in enumerate(pems)}


def _run(*argv: str) -> None:
    tool = shutil.which(argv[0])
    if tool is None:
        raise UsageError(f"`{argv[0]}` is not installed (wireguard-tools, iproute2)")
    done = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, check=False)  # noqa: S603  # fixed tools, checked arguments
    if done.returncode != 0:
        raise UsageError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


@cluster.command()
@click.option("--config", "config_file", type=CONFIG, default=None, help="TOML settings file")
@click.option("--interface", default="tdllm0", show_default=True, help="the WireGuard interface")
@click.option("--listen-port", type=click.IntRange(1, 65535), default=51820, show_default=True)
@click.option(
    "--prefix-length",
    type=click.IntRange(8, 128),
    default=24,
    show_default=True,
    help="of the overlay network around cluster_address",
)
@click.option(
    "--endpoints",
    type=CONFIG,
    default=None,
    help="JSON {overlay address: 'underlay IP:port'} (from the playbook; not trusted)",
)
@click.option(
    "--offline", is_flag=True, help="only cluster_dir/peers/*.crt, not the broker's roster"
)
@click.option("--dry-run", is_flag=True, help="print the peers admitted, change nothing")
def wireguard(
    config_file: Path | None,
    interface: str,
    listen_port: int,
    prefix_length: int,
    endpoints: Path | None,
    offline: bool,
    dry_run: bool,
) -> None:
    """Admit into the overlay every peer whose certificate chains to the cluster CA from the
    broker's signed answer, is valid now and names one address. Certificates come from the
    broker's roster (GET /v1/cluster/nodes) and cluster_dir/peers/*.crt; run it again (the
    role's timer does) to add nodes that joined since and drop expired ones."""
    from tdllm_attest.cluster.identity import CA_CERT, NODE_CERT, WIREGUARD_KEY
    from tdllm_attest.cluster.peers import (
        admit_peers,
        load_certificate,
        render_wireguard_peers,
        verify_node_certificate,
    )
    from tdllm_attest.errors import ClusterCertificateError

    if not INTERFACE_NAME.fullmatch(interface):
        raise UsageError("--interface: 1..15 letters, digits, '-' or '_'")
    settings = _settings(config_file)
    directory = Path(settings.cluster_dir)
    now = datetime.now(UTC)
    try:
        ca = load_certificate(_read(directory / CA_CERT))
        me = verify_node_certificate(load_certificate(_read(directory / NODE_CERT)), ca, now=now)
    except ClusterCertificateError as exc:
        raise UsageError(f"this node's own certificate: {exc}") from None
    if me.address != ip_address(settings.cluster_address):
        raise UsageError(f"this node's certificate is for {me.address}, not cluster_address")
    sources = {p.name: _read(p) for p in sorted((directory / PEERS_DIR).glob("*.crt"))}
    if not offline:
        sources |= _roster(settings)
    admission = admit_peers(sources, ca, now=now, own_address=me.address)
    for source, why in admission.refused:
        click.echo(f"refused {source}: {why}", err=True)
    for peer in admission.peers:
        click.echo(
            f"admitted {peer.address} (certificate {peer.sha256[:16]}…, "
            f"until {peer.not_after:%Y-%m-%d %H:%M}Z)"
        )
    peers = render_wireguard_peers(admission.peers, _endpoints(endpoints))
    if dry_run:
        click.echo(peers, nl=False)
        return
    private = _read(directory / WIREGUARD_KEY).decode().strip()
    text = f"[Interface]\nPrivateKey = {private}\nListenPort = {listen_port}\n\n{peers}"
    path = directory / WG_CONFIG
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    path.write_text(text)
    if (
        subprocess.run(  # noqa: S603  # iproute2, fixed arguments
            [shutil.which("ip") or "ip", "link", "show", interface],
            capture_output=True,
            check=False,
        ).returncode
        != 0
    ):
        _run("ip", "link", "add", interface, "type", "wireguard")
    _run("wg", "setconf", interface, str(path))
    _run("ip", "address", "replace", f"{me.address}/{prefix_length}", "dev", interface)
    _run("ip", "link", "set", interface, "up")
    click.echo(f"{interface}: {me.address}/{prefix_length}, {len(admission.peers)} peer(s)")
