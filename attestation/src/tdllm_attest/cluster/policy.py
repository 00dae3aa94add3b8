"""The `cluster` section of a key policy: which nodes the broker certifies, for how long."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from ipaddress import IPv4Network, IPv6Network

from tdllm_attest.cluster.request import NodeRequest
from tdllm_attest.errors import ClusterPolicyError

MAX_CERTIFICATE_LIFETIME = timedelta(days=30)
DEFAULT_CERTIFICATE_LIFETIME = timedelta(hours=24)


@dataclass(frozen=True)
class ClusterPolicy:
    """Node certificates are issued only for addresses inside `networks` (the overlay), last
    `certificate_lifetime`, and, with `wireguard`, must carry the node's WireGuard key."""

    networks: tuple[IPv4Network | IPv6Network, ...]
    certificate_lifetime: timedelta = DEFAULT_CERTIFICATE_LIFETIME
    wireguard: bool = True

    def __post_init__(self) -> None:
        if not self.networks:
            raise ValueError("a cluster policy needs at least one network")
        if not timedelta(seconds=60) <= self.certificate_lifetime <= MAX_CERTIFICATE_LIFETIME:
            raise ValueError("certificate_lifetime_s must be between 60 s and 30 days")

    def check(self, request: NodeRequest) -> None:
        """Raise ClusterPolicyError unless the policy lets `request` be certified."""
        if not any(request.address in network for network in self.networks):
            raise ClusterPolicyError(
                f"cluster address {request.address} is outside the policy's networks "
                f"{[str(n) for n in self.networks]}"
            )
        if self.wireguard and request.wireguard_key is None:
            raise ClusterPolicyError("the policy requires the node's WireGuard key in its CSR")
