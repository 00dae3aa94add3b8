"""Trust anchors: the pinned Intel SGX Root CA, and the one gate to a simulated (test) root.

The production anchor is embedded here and pinned by SHA-256; it is never taken from the quote or
the collateral. A different anchor (a test PKI) can be passed to the verifier explicitly, but an
anchor whose subject claims to be Intel and whose hash is not the pin is always refused.

`select_trust_anchor` picks the anchor for an attestation mode. A simulated root (the DER that
the caller read, e.g. `tdllm_attest.testing.platform.SimulatedTdxPlatform.root_der` or a
`--simulated-root` file) is usable only through `simulated_trust_anchor`, which demands BOTH the
configured mode "simulated" AND the environment variable `TDLLM_ALLOW_SIMULATED_TDX=1`, and logs a
warning every time. This module never imports the simulator (`tdllm_attest.testing`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tdllm_attest.errors import ChainError

log = logging.getLogger(__name__)

ALLOW_SIMULATED_ENV = "TDLLM_ALLOW_SIMULATED_TDX"
MODE_SIMULATED = "simulated"
MODE_PRODUCTION = "production"
AttestationMode = Literal["production", "simulated"]

INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
# The one identity allowed to sign TCB Info and QE Identity (as Intel's QVL/QvE pin it): any other
# key that chains to the root (a PCK leaf, a PCK CA) could otherwise re-sign the TCB levels.
INTEL_TCB_SIGNING_CN = "Intel SGX TCB Signing"
# Its counterpart under a simulated (test) root; never accepted under Intel's root.
SIMULATED_TCB_SIGNING_CN = "TDLLM UNSAFE TEST TCB Signing"

# Intel SGX Root CA (public certificate, valid 2018-05-21 .. 2049-12-31).
INTEL_SGX_ROOT_CA_PEM = b"""-----BEGIN CERTIFICATE-----
MIICjzCCAjSgAwIBAgIUImUM1lqdNInzg7SVUr9QGzknBqwwCgYIKoZIzj0EAwIw
aDEaMBgGA1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENv
cnBvcmF0aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJ
BgNVBAYTAlVTMB4XDTE4MDUyMTEwNDUxMFoXDTQ5MTIzMTIzNTk1OVowaDEaMBgG
A1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENvcnBvcmF0
aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJBgNVBAYT
AlVTMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEC6nEwMDIYZOj/iPWsCzaEKi7
1OiOSLRFhWGjbnBVJfVnkY4u3IjkDYYL0MxO4mqsyYjlBalTVYxFP2sJBK5zlKOB
uzCBuDAfBgNVHSMEGDAWgBQiZQzWWp00ifODtJVSv1AbOScGrDBSBgNVHR8ESzBJ
MEegRaBDhkFodHRwczovL2NlcnRpZmljYXRlcy50cnVzdGVkc2VydmljZXMuaW50
ZWwuY29tL0ludGVsU0dYUm9vdENBLmRlcjAdBgNVHQ4EFgQUImUM1lqdNInzg7SV
Ur9QGzknBqwwDgYDVR0PAQH/BAQDAgEGMBIGA1UdEwEB/wQIMAYBAf8CAQEwCgYI
KoZIzj0EAwIDSQAwRgIhAOW/5QkR+S9CiSDcNoowLuPRLsWGf/Yi7GSX94BgwTwg
AiEA4J0lrHoMs+Xo5o/sX6O9QWxHRAvZUGOdRQ7cvqRXaqI=
-----END CERTIFICATE-----
"""


@dataclass(frozen=True)
class TrustAnchor:
    """A root certificate that the PCK chain and all collateral chains must lead to."""

    der: bytes
    certificate: x509.Certificate
    sha256: str
    is_intel: bool

    @property
    def tcb_signing_cn(self) -> str:
        """Subject CN of the certificate that must sign TCB Info / QE Identity under this root."""
        return INTEL_TCB_SIGNING_CN if self.is_intel else SIMULATED_TCB_SIGNING_CN

    @classmethod
    def from_der(cls, der: bytes) -> TrustAnchor:
        """Build an anchor from DER; refuses a look-alike Intel root that is not the pinned one."""
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise ChainError(f"trust anchor is not a DER certificate: {exc}") from None
        digest = hashlib.sha256(der).hexdigest()
        is_intel = digest == INTEL_SGX_ROOT_CA_SHA256
        if not is_intel and "intel" in cert.subject.rfc4514_string().lower():
            raise ChainError(
                "trust anchor claims to be Intel but is not the pinned Intel SGX Root CA "
                f"(sha256 {digest})"
            )
        return cls(der=der, certificate=cert, sha256=digest, is_intel=is_intel)

    @classmethod
    def intel(cls) -> TrustAnchor:
        """The pinned production anchor, the Intel SGX Root CA."""
        der = x509.load_pem_x509_certificate(INTEL_SGX_ROOT_CA_PEM).public_bytes(Encoding.DER)
        anchor = cls.from_der(der)
        if not anchor.is_intel:  # the embedded copy must match the pin
            raise ChainError("embedded Intel SGX Root CA does not match its pinned SHA-256")
        return anchor


class SimulationRefused(ChainError):  # noqa: N818  # reads as the event it reports
    """The simulated trust anchor was requested without both switches set."""


def simulated_trust_anchor(
    root_der: bytes, *, mode: str, environ: Mapping[str, str]
) -> TrustAnchor:
    """The ONE gate for a simulated anchor: config mode "simulated" AND the env switch.

    Refuses (raises `SimulationRefused`) unless `mode == "simulated"` and
    `environ[TDLLM_ALLOW_SIMULATED_TDX] == "1"`; refuses the Intel root too (no mixing). Logs a
    warning on every acceptance. There is no fallback: callers in production mode never get here.
    """
    allowed = environ.get(ALLOW_SIMULATED_ENV) == "1"
    if mode != MODE_SIMULATED or not allowed:
        raise SimulationRefused(
            f"simulated TDX trust anchor refused: needs attestation mode 'simulated' (is {mode!r})"
            f" and {ALLOW_SIMULATED_ENV}=1 (is {'set' if allowed else 'unset'})"
        )
    anchor = TrustAnchor.from_der(root_der)
    if anchor.is_intel:
        raise SimulationRefused("the Intel root is not a simulated anchor")
    log.warning(
        "UNSAFE: accepting SIMULATED TDX evidence under test root sha256=%s; "
        "nothing verified against it proves anything",
        anchor.sha256,
    )
    return anchor


def select_trust_anchor(
    mode: str, *, simulated_root_der: bytes | None, environ: Mapping[str, str]
) -> TrustAnchor:
    """Production -> the pinned Intel root; simulated -> the gated test root. Nothing else.

    Any other mode, or simulated mode without a root, is refused (no silent fallback).
    """
    if mode == MODE_PRODUCTION:
        return TrustAnchor.intel()
    if mode == MODE_SIMULATED and simulated_root_der is not None:
        return simulated_trust_anchor(simulated_root_der, mode=mode, environ=environ)
    raise SimulationRefused(f"attestation mode {mode!r} without a usable trust anchor")
