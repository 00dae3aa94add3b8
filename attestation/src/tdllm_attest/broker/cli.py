"""`tdllm-broker serve`: run the key broker (loopback by default; put TLS in front of it)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from werkzeug.serving import run_simple

from tdllm_attest.broker.app import create_app
from tdllm_attest.broker.keystore import Keystore, load_kek
from tdllm_attest.broker.settings import BrokerSettings
from tdllm_attest.broker.signing import load_signing_key, write_signing_key_pair
from tdllm_attest.cluster.ca import ClusterCa, load_cluster_ca
from tdllm_attest.collateral import CollateralSource
from tdllm_attest.errors import AttestationError
from tdllm_attest.gpu.anchors import GpuAnchors, select_gpu_anchors
from tdllm_attest.gpu.rim import RimStore
from tdllm_attest.pccs import CollateralCache, PccsClient, PccsCollateralSource, default_cache_dir
from tdllm_attest.policy_format import load_policy, load_public_key
from tdllm_attest.trust import select_trust_anchor

log = logging.getLogger("tdllm_attest.broker")


def collateral_source(doc: dict[str, Any]) -> CollateralSource | None:
    """The broker's own collateral: a PCCS (`pccs_url`) with an on-disk cache
    (`collateral_cache_dir`, default ~/.cache/tdllm/collateral)."""
    url = doc.get("pccs_url")
    if url is None:
        return None
    if not isinstance(url, str):
        raise click.UsageError("broker config: pccs_url must be a URL string")
    cache_dir = doc.get("collateral_cache_dir")
    cache = CollateralCache(Path(cache_dir) if cache_dir else default_cache_dir())
    return PccsCollateralSource(PccsClient(url), cache)


def signing_key(doc: dict[str, Any]) -> Ed25519PrivateKey:
    """The answer-signing key (`signing_key`: an Ed25519 PKCS#8 PEM file); required."""
    path = doc.get("signing_key")
    if not isinstance(path, str) or not path:
        raise click.UsageError(
            "broker config: signing_key is required (an Ed25519 private key PEM; the TD's image "
            "pins its public half; make one with `tdllm-broker keygen --out PREFIX`)"
        )
    try:
        return load_signing_key(Path(path))
    except ValueError as exc:
        raise click.UsageError(f"broker config: {exc}") from None


def gpu_settings(doc: dict[str, Any]) -> tuple[RimStore | None, GpuAnchors | None]:
    """The gpu-cc profile's collateral: `gpu_rims` (a directory of NVIDIA's RIM .swidtag files)
    and the roots GPU evidence must chain to: NVIDIA's in production, in simulated mode the test
    roots of `simulated_gpu_roots` {"device": DER file, "rim": DER file} (two switches)."""
    directory = doc.get("gpu_rims")
    if directory is None:
        return None, None
    if not isinstance(directory, str):
        raise click.UsageError("broker config: gpu_rims must be a directory path")
    roots = doc.get("simulated_gpu_roots")
    simulated = None
    if roots is not None:
        if not (isinstance(roots, dict) and set(roots) == {"device", "rim"}):
            raise click.UsageError('broker config: simulated_gpu_roots is {"device", "rim"}')
        if doc.get("mode") != "simulated":  # a test root in a production config: a mistake
            raise click.UsageError("broker config: simulated_gpu_roots needs mode 'simulated'")
        simulated = (Path(roots["device"]).read_bytes(), Path(roots["rim"]).read_bytes())
    try:
        rims = RimStore.from_directory(directory)
        anchors = select_gpu_anchors(doc["mode"], simulated_roots=simulated, environ=os.environ)
    except AttestationError as exc:
        raise click.UsageError(f"broker config: gpu: {exc}") from None
    return rims, anchors


def cluster_ca_settings(doc: dict[str, Any]) -> ClusterCa | None:
    """The cluster CA (`cluster_ca_key` PKCS#8 PEM + `cluster_ca_cert` PEM), both or neither."""
    key_path, cert_path = doc.get("cluster_ca_key"), doc.get("cluster_ca_cert")
    if key_path is None and cert_path is None:
        return None
    if not isinstance(key_path, str) or not isinstance(cert_path, str):
        raise click.UsageError("broker config: cluster_ca_key and cluster_ca_cert come together")
    try:
        return load_cluster_ca(Path(key_path), Path(cert_path))
    except ValueError as exc:
        raise click.UsageError(f"broker config: {exc}") from None


def settings_from_file(path: Path) -> BrokerSettings:
    """Config JSON: mode, keystore, kek, signing_key (Ed25519 PEM), policy_public_key, policies
    {name: file}, pccs_url (+ optional collateral_cache_dir), optional simulated_root (DER file;
    needs mode "simulated" and TDLLM_ALLOW_SIMULATED_TDX=1), optional
    accept_request_collateral_insecure (dev only), optional gpu_rims and simulated_gpu_roots
    (`gpu_settings`), optional cluster_ca_key + cluster_ca_cert (`cluster_ca_settings`)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    source = collateral_source(doc)
    insecure = doc.get("accept_request_collateral_insecure", False) is True
    if source is None and not insecure:
        raise click.UsageError(
            "broker config: pccs_url is required (the broker verifies quotes against collateral "
            "it fetches itself; accept_request_collateral_insecure is for development only)"
        )
    if insecure:
        log.warning(
            "INSECURE: accepting collateral from attest requests (the host may pick stale "
            "collateral); never in production"
        )
    answer_key = signing_key(doc)
    key = load_public_key(Path(doc["policy_public_key"]).read_bytes())
    policies = {
        name: load_policy(Path(file).read_text(encoding="utf-8"), key)
        for name, file in doc["policies"].items()
    }
    root = doc.get("simulated_root")
    anchor = select_trust_anchor(
        doc["mode"],
        simulated_root_der=Path(root).read_bytes() if root else None,
        environ=os.environ,
    )
    keystore = Keystore.load(Path(doc["keystore"]), load_kek(Path(doc["kek"])))
    gpu_rims, gpu_anchors = gpu_settings(doc)
    return BrokerSettings(
        keystore=keystore,
        policies=policies,
        anchor=anchor,
        signing_key=answer_key,
        collateral=source,
        accept_request_collateral_insecure=insecure,
        gpu_rims=gpu_rims,
        gpu_anchors=gpu_anchors,
        cluster_ca=cluster_ca_settings(doc),
    )


@click.group()
def main() -> None:
    """tdllm key broker (protocol tdllm-kb/1, see docs/attestation.md)."""


def _networks(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> tuple[IPv4Network | IPv6Network, ...]:
    """`--trusted-proxy` values as networks (a bare address is a /32 or /128)."""
    try:
        return tuple(ip_network(value.strip()) for value in values)
    except ValueError as exc:
        raise click.BadParameter(f"not a network in CIDR notation: {exc}") from None


@main.command()
@click.option("--config", "config", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8750, show_default=True, type=int)
@click.option(
    "--trusted-proxy",
    "trusted_proxies",
    metavar="CIDR",
    multiple=True,
    callback=_networks,
    help="A reverse proxy whose X-Forwarded-For is believed (repeatable; default: none, the "
    "header is ignored). List only your own proxies: any client inside these networks can "
    "choose the address it is rate limited as.",
)
def serve(
    config: Path, host: str, port: int, trusted_proxies: tuple[IPv4Network | IPv6Network, ...]
) -> None:
    """Serve POST /v1/challenge and POST /v1/attest."""
    logging.basicConfig(level=logging.INFO)
    settings = settings_from_file(config)
    if trusted_proxies:
        settings = dataclasses.replace(settings, trusted_proxies=tuple(trusted_proxies))
    run_simple(host, port, create_app(settings), threaded=True)


def _out_option(public_suffix: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """`--out PREFIX` of a command that writes a key pair (the private half never overwritten)."""
    return click.option(
        "--out",
        "prefix",
        type=click.Path(path_type=Path, dir_okay=False),
        required=True,
        help=f"writes PREFIX.key.pem (private, mode 0600) and PREFIX.{public_suffix}",
    )


@main.command()
@_out_option("pub.pem")
def keygen(prefix: Path) -> None:
    """Make the broker's Ed25519 answer-signing key pair (never overwrites).

    The private key goes into the broker config (`signing_key`); the public key is pinned in
    the TD's measured image (the service's `broker_public_key`).
    """
    try:
        private, public = write_signing_key_pair(prefix)
    except (FileExistsError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {private} (private, mode 0600: signing_key) and {public} (pin in the image)")


@main.command("cluster-ca")
@_out_option("crt.pem")
@click.option("--name", default="tdllm cluster CA", show_default=True, help="the CA's CN")
@click.option(
    "--days", default=365, show_default=True, type=click.IntRange(1, 3650), help="lifetime"
)
def cluster_ca(prefix: Path, name: str, days: int) -> None:
    """Make the cluster CA that certifies attested cluster nodes (never overwrites).

    Both files go into the broker config (`cluster_ca_key`, `cluster_ca_cert`); nodes receive
    the certificate in the broker's signed answer (docs/attestation.md).
    """
    ca = ClusterCa.generate(now=datetime.now(UTC), name=name, lifetime=timedelta(days=days))
    try:
        key_path, cert_path = ca.write(prefix)
    except (FileExistsError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {key_path} (private, mode 0600: cluster_ca_key) and {cert_path}")
