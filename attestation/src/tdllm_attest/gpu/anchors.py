"""Trust anchors for GPU evidence: NVIDIA's two pinned roots, and the one gate to test roots.

Both roots are embedded here and pinned by SHA-256; neither is ever taken from the evidence or
from a RIM. `GpuAnchors` refuses a look-alike (a subject that claims NVIDIA with another hash), so
a self-made "NVIDIA" root cannot stand in for the real one, not even in simulated mode.

A synthetic GPU's test roots (`tdllm_attest.testing.gpu`) are usable only through
`simulated_gpu_anchors`, behind the same two switches as simulated TDX (`tdllm_attest.trust`):
attestation mode "simulated" AND `TDLLM_ALLOW_SIMULATED_TDX=1`. This module never imports the
simulator.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tdllm_attest.trust import (
    ALLOW_SIMULATED_ENV,
    MODE_PRODUCTION,
    MODE_SIMULATED,
    SimulationRefused,
)

log = logging.getLogger(__name__)

# Both from nv-local-gpu-verifier 2.7.3 (verifier/certs/), public certificates.
# "NVIDIA Device Identity CA": roots every Hopper device chain; valid 2021-11-05 .. 9999-12-31.
NVIDIA_DEVICE_ROOT_SHA256 = "102bf659d5419614c9d8e6aecebc80454eb26b1df6a769ac720b9a690b167b48"
NVIDIA_DEVICE_ROOT_PEM = b"""-----BEGIN CERTIFICATE-----
MIICCzCCAZCgAwIBAgIQLTZwscoQBBHB/sDoKgZbVDAKBggqhkjOPQQDAzA1MSIw
IAYDVQQDDBlOVklESUEgRGV2aWNlIElkZW50aXR5IENBMQ8wDQYDVQQKDAZOVklE
SUEwIBcNMjExMTA1MDAwMDAwWhgPOTk5OTEyMzEyMzU5NTlaMDUxIjAgBgNVBAMM
GU5WSURJQSBEZXZpY2UgSWRlbnRpdHkgQ0ExDzANBgNVBAoMBk5WSURJQTB2MBAG
ByqGSM49AgEGBSuBBAAiA2IABA5MFKM7+KViZljbQSlgfky/RRnEQScW9NDZF8SX
gAW96r6u/Ve8ZggtcYpPi2BS4VFu6KfEIrhN6FcHG7WP05W+oM+hxj7nyA1r1jkB
2Ry70YfThX3Ba1zOryOP+MJ9vaNjMGEwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8B
Af8EBAMCAQYwHQYDVR0OBBYEFFeF/4PyY8xlfWi3Olv0jUrL+0lfMB8GA1UdIwQY
MBaAFFeF/4PyY8xlfWi3Olv0jUrL+0lfMAoGCCqGSM49BAMDA2kAMGYCMQCPeFM3
TASsKQVaT+8S0sO9u97PVGCpE9d/I42IT7k3UUOLSR/qvJynVOD1vQKVXf0CMQC+
EY55WYoDBvs2wPAH1Gw4LbcwUN8QCff8bFmV4ZxjCRr4WXTLFHBKjbfneGSBWwA=
-----END CERTIFICATE-----
"""
# "NVIDIA CoRIM signing Root CA": roots the RIM signing chains; valid 2023-03-16 .. 2053-03-08.
NVIDIA_RIM_ROOT_SHA256 = "12977b5115acb0381179279fffeb5a8c4d264971ebb32298023a465fa41df5d1"
NVIDIA_RIM_ROOT_PEM = b"""-----BEGIN CERTIFICATE-----
MIICKTCCAbCgAwIBAgIQRdrjoA5QN73fh1N17LXicDAKBggqhkjOPQQDAzBFMQsw
CQYDVQQGEwJVUzEPMA0GA1UECgwGTlZJRElBMSUwIwYDVQQDDBxOVklESUEgQ29S
SU0gc2lnbmluZyBSb290IENBMCAXDTIzMDMxNjE1MzczNFoYDzIwNTMwMzA4MTUz
NzM0WjBFMQswCQYDVQQGEwJVUzEPMA0GA1UECgwGTlZJRElBMSUwIwYDVQQDDBxO
VklESUEgQ29SSU0gc2lnbmluZyBSb290IENBMHYwEAYHKoZIzj0CAQYFK4EEACID
YgAEuECyi9vNM+Iw2lfUzyBldHAwaC1HF7TCgp12QcEyUTm3Tagxwr48d55+K2VI
lWYIDk7NlAIQdcV/Ff7euGLI+Qauj93HsSI4WX298PpW54RTgz9tC+Q684caR/BX
WEeZo2MwYTAdBgNVHQ4EFgQUpaXrOPK4ZDAk08DBskn594zeZjAwHwYDVR0jBBgw
FoAUpaXrOPK4ZDAk08DBskn594zeZjAwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8B
Af8EBAMCAQYwCgYIKoZIzj0EAwMDZwAwZAIwHGDyscDP6ihHqRvZlI3eqZ4YkvjE
1duaN84tAHRVgxVMvNrp5Tnom3idHYGW/dskAjATvjIx6VzHm/4e2GiZAyZEIUBD
OKPzp5ei/A0iUZpdvngenDwV8Qa/wGdiTmJ7Bp4=
-----END CERTIFICATE-----
"""


def _load_root(der: bytes, role: str, pin: str) -> tuple[x509.Certificate, bool]:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise SimulationRefused(f"GPU {role} root is not a DER certificate: {exc}") from None
    is_nvidia = hashlib.sha256(der).hexdigest() == pin
    if not is_nvidia and "nvidia" in cert.subject.rfc4514_string().lower():
        raise SimulationRefused(
            f"GPU {role} root claims to be NVIDIA but is not the pinned one "
            f"(sha256 {hashlib.sha256(der).hexdigest()})"
        )
    return cert, is_nvidia


@dataclass(frozen=True)
class GpuAnchors:
    """The roots that device chains (`device_root_der`) and RIM chains (`rim_root_der`) must
    end in, byte for byte. `is_nvidia`: both are NVIDIA's pinned roots."""

    device_root_der: bytes = field(repr=False)
    rim_root_der: bytes = field(repr=False)
    device_root: x509.Certificate = field(init=False, repr=False, compare=False)
    rim_root: x509.Certificate = field(init=False, repr=False, compare=False)
    is_nvidia: bool = field(init=False)

    def __post_init__(self) -> None:
        device, device_nv = _load_root(self.device_root_der, "device", NVIDIA_DEVICE_ROOT_SHA256)
        rim, rim_nv = _load_root(self.rim_root_der, "RIM", NVIDIA_RIM_ROOT_SHA256)
        if device_nv != rim_nv:  # no mixing: both NVIDIA's, or both a test PKI's
            raise SimulationRefused("GPU anchors mix an NVIDIA root with a test root")
        object.__setattr__(self, "device_root", device)
        object.__setattr__(self, "rim_root", rim)
        object.__setattr__(self, "is_nvidia", device_nv)


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def nvidia_anchors() -> GpuAnchors:
    """The production anchors: NVIDIA's pinned device and RIM roots."""
    anchors = GpuAnchors(_der(NVIDIA_DEVICE_ROOT_PEM), _der(NVIDIA_RIM_ROOT_PEM))
    if not anchors.is_nvidia:  # the embedded copies must match their pins
        raise SimulationRefused("embedded NVIDIA roots do not match their pinned SHA-256")
    return anchors


def simulated_gpu_anchors(
    device_root_der: bytes, rim_root_der: bytes, *, mode: str, environ: Mapping[str, str]
) -> GpuAnchors:
    """The ONE gate for test GPU roots: mode "simulated" AND TDLLM_ALLOW_SIMULATED_TDX=1.

    Raises `SimulationRefused` otherwise, or for NVIDIA's roots (no mixing); warns every time.
    """
    allowed = environ.get(ALLOW_SIMULATED_ENV) == "1"
    if mode != MODE_SIMULATED or not allowed:
        raise SimulationRefused(
            f"simulated GPU trust anchors refused: needs attestation mode 'simulated' (is {mode!r})"
            f" and {ALLOW_SIMULATED_ENV}=1 (is {'set' if allowed else 'unset'})"
        )
    anchors = GpuAnchors(device_root_der, rim_root_der)
    if anchors.is_nvidia:
        raise SimulationRefused("NVIDIA's roots are not simulated GPU anchors")
    log.warning(
        "UNSAFE: accepting SIMULATED GPU evidence under test roots (device sha256=%s, RIM "
        "sha256=%s); nothing verified against them proves anything",
        hashlib.sha256(device_root_der).hexdigest(),
        hashlib.sha256(rim_root_der).hexdigest(),
    )
    return anchors


def select_gpu_anchors(
    mode: str,
    *,
    simulated_roots: tuple[bytes, bytes] | None,
    environ: Mapping[str, str],
) -> GpuAnchors:
    """Production -> NVIDIA's pinned roots; simulated -> the gated test roots. Nothing else.

    `simulated_roots` is (device root DER, RIM root DER); without it simulated mode is refused.
    """
    if mode == MODE_PRODUCTION:
        return nvidia_anchors()
    if mode == MODE_SIMULATED and simulated_roots is not None:
        device, rim = simulated_roots
        return simulated_gpu_anchors(device, rim, mode=mode, environ=environ)
    raise SimulationRefused(f"attestation mode {mode!r} without usable GPU trust anchors")
