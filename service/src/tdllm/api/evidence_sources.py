"""What this TD attests with, from its settings (or what a test or `make run` injects): the
quote provider, the GPUs' evidence (profile gpu-cc), the collateral served beside quotes, and a
cluster node's fresh keys. Boot (and `create_app` before it) and the cluster commands use them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any

from tdllm.settings import GPU_CC, Settings

if TYPE_CHECKING:
    from tdllm_attest.cluster.identity import NodeIdentity

log = logging.getLogger("tdllm.api.boot")  # boot's log: these run as part of it


def quote_provider_for(settings: Settings, injected: Any = None) -> tuple[Any, bool]:
    """(provider, simulated) for the configured attestation mode (`injected`: a test's or `make
    run`'s); None when there is none."""
    if injected is not None:
        return injected, settings.attestation == "simulated"
    if settings.attestation == "tdx":
        from tdllm_attest.quote import ConfigfsTsmProvider

        return ConfigfsTsmProvider(), False
    if settings.attestation == "simulated" and settings.simulated_quote_url:
        from tdllm_attest.testing.qgs import SimulatedQgsProvider

        log.warning(
            "UNSAFE: attestation mode 'simulated': quotes from the simulated quote service %s "
            "prove nothing",
            settings.simulated_quote_url,
        )
        return SimulatedQgsProvider(settings.simulated_quote_url), True
    if settings.attestation == "simulated":  # Settings already demanded the environment switch
        from tdllm_attest.testing.platform import SimulatedTdxPlatform
        from tdllm_attest.testing.provider import SimulatedProvider

        log.warning("UNSAFE: attestation mode 'simulated': quotes prove nothing")
        return SimulatedProvider(SimulatedTdxPlatform(datetime.now(UTC))), True
    return None, False


def cluster_node(settings: Settings) -> NodeIdentity | None:
    """Fresh node keys for the configured cluster address (a cluster node), else None."""
    if settings.cluster_address is None:
        return None
    from tdllm_attest.cluster.identity import NodeIdentity

    return NodeIdentity.generate(ip_address(settings.cluster_address))


def gpu_evidence_for(
    settings: Settings, injected: Callable[[bytes], Any] | None = None
) -> Callable[[bytes], Any] | None:
    """The gpu-cc profile's evidence source: injected (tests), NVIDIA's driver, or an UNSAFE
    synthetic GPU (gpu_evidence 'simulated', which Settings allow only in simulated mode)."""
    if settings.profile != GPU_CC:
        return None
    if injected is not None:
        return injected
    if settings.gpu_evidence == "simulated":
        from tdllm_attest.testing.gpu import SyntheticGpu

        log.warning("UNSAFE: gpu_evidence 'simulated': a synthetic GPU's evidence proves nothing")
        return SyntheticGpu(datetime.now(UTC)).collect
    from tdllm_attest.gpu.collect import NvmlEvidenceSource

    return NvmlEvidenceSource()


def collateral_for(
    settings: Settings, injected: Callable[[bytes], str] | None, provider: Any
) -> Callable[[bytes], str] | None:
    """Collateral to serve with a quote on /v1/attestation: injected (tests), else what the quote
    provider serves (the simulated quote service does), else from the configured PCCS (cached
    in memory until it is due for a refresh), else none (clients fetch their own).

    Only clients read it, and they check it themselves; the key broker fetches its own.
    """
    served: Callable[[bytes], str] | None = getattr(provider, "collateral", None)
    if (given := injected or served) is not None:
        return given
    if settings.pccs_url is None:
        return None
    from tdllm_attest.pccs import MemoryCollateralCache, PccsClient, PccsCollateralSource

    source = PccsCollateralSource(PccsClient(settings.pccs_url), MemoryCollateralCache())
    return lambda quote: source.get(quote).source_json
