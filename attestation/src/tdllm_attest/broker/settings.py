"""Everything the broker needs, injected: keystore, policies, trust anchor, clock, limits."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Network, IPv6Network

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tdllm_attest.broker.keystore import Keystore
from tdllm_attest.cluster.ca import ClusterCa
from tdllm_attest.collateral import CollateralSource
from tdllm_attest.gpu.anchors import GpuAnchors
from tdllm_attest.gpu.rim import RimStore
from tdllm_attest.policy_format import Policy
from tdllm_attest.trust import TrustAnchor


def system_clock() -> datetime:
    """The real time (the only place the broker reads it); tests inject their own clock."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class BrokerSettings:
    """Broker configuration. The anchor decides the mode: Intel's root means production.

    Build the anchor with `tdllm_attest.trust.select_trust_anchor`, never by hand, so the
    simulated test root only ever comes through its two-switch gate.
    """

    keystore: Keystore
    policies: Mapping[str, Policy]
    anchor: TrustAnchor
    # signs every attest answer; its public half is pinned in the TD's measured image, so a
    # "broker" the host runs itself cannot hand the TD a key (docs/attestation.md)
    signing_key: Ed25519PrivateKey
    now: Callable[[], datetime] = system_clock
    # The broker's own collateral source (a PCCS client in production). Collateral that the
    # request carries comes from the host, which would pick the oldest still-valid one (hiding a
    # revocation or TCB recovery): it is ignored unless this loudly named dev switch is on.
    collateral: CollateralSource | None = None
    accept_request_collateral_insecure: bool = False
    session_ttl: timedelta = timedelta(seconds=60)
    max_body_bytes: int = 1024 * 1024  # a CCEL log area is 256 KiB (base64: ~350 KB)
    rate_limit: int = 30
    rate_window: timedelta = timedelta(seconds=60)
    # peers whose X-Forwarded-For is believed (CIDRs); empty: the header is never read
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    max_rate_clients: int = 10_000  # rate-limit counters kept (oldest evicted, expired first)
    max_sessions: int = 10_000  # pending challenges kept (oldest evicted, expired first)
    # the gpu-cc profile: NVIDIA's reference integrity manifests (the GPU's collateral, like
    # Intel's from the PCCS) and the roots GPU evidence must chain to; a policy with a `gpu`
    # section is refused while either is missing
    gpu_rims: RimStore | None = None
    gpu_anchors: GpuAnchors | None = None
    # the model owner's cluster CA: certifies attested cluster nodes (a policy with a `cluster`
    # section); without it such requests are 503 cluster-ca-unavailable
    cluster_ca: ClusterCa | None = None
    max_cluster_nodes: int = 256  # node certificates remembered per key (GET /v1/cluster/nodes)

    def __post_init__(self) -> None:
        for name in ("max_rate_clients", "max_sessions", "max_cluster_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    @property
    def simulated(self) -> bool:
        """True when evidence is verified against a simulated (non-Intel) root."""
        return not self.anchor.is_intel
