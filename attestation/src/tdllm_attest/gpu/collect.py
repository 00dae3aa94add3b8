"""In the TD: the attestation evidence of its confidential-computing GPUs, through NVIDIA's driver.

`NvmlEvidenceSource()(nonce)` asks every GPU for an SPDM GET_MEASUREMENTS report over `nonce`
(32 bytes, `tdllm_attest.gpu.binding.gpu_nonce`) and for its device certificate chain, with
NVIDIA's NVML bindings (`nvidia-ml-py`, the `gpu` extra; imported only here). It refuses to
collect unless the driver says confidential computing is on in production mode with the
developer tools off: the report is signed by the GPU, but whether the TD's driver talks to the
GPU over the encrypted bounce buffers of CC mode is the TD's own knowledge, and the TD is what
the quote beside this evidence vouches for.

Runs only where a GPU is (the `gpu` test marker). Tests and the simulated mode use
`tdllm_attest.testing.gpu.SyntheticGpu.collect` instead.
"""

from __future__ import annotations

import threading
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tdllm_attest.errors import GpuEvidenceError
from tdllm_attest.gpu.evidence import GpuEvidence

NONCE_SIZE = 32
_lock = threading.Lock()  # NVML calls from two threads at once (boot and /v1/attestation)


def _nvml() -> Any:
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise GpuEvidenceError(
            "GPU evidence needs NVIDIA's NVML bindings: pip install 'tdllm-attest[gpu]'"
        ) from None
    return pynvml


def _check_cc_on(nvml: Any) -> None:
    state = nvml.nvmlSystemGetConfComputeState()
    if state.ccFeature != nvml.NVML_CC_SYSTEM_FEATURE_ENABLED:
        raise GpuEvidenceError("the GPU driver says confidential computing is off")
    if state.devToolsMode != nvml.NVML_CC_SYSTEM_DEVTOOLS_MODE_OFF:
        raise GpuEvidenceError("the GPUs run in CC developer-tools mode (debuggable)")
    if state.environment != nvml.NVML_CC_SYSTEM_ENVIRONMENT_PROD:
        raise GpuEvidenceError("the GPUs' confidential-computing environment is not production")


def _chain_der(pem: bytes) -> tuple[bytes, ...]:
    """The device chain NVML gives as concatenated PEM, as DER, leaf first."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise GpuEvidenceError("the GPU's certificate chain is not PEM") from None
    return tuple(cert.public_bytes(Encoding.DER) for cert in certs)


class NvmlEvidenceSource:
    """Evidence of every GPU the driver lists, in index order (callable: nonce -> list)."""

    def __call__(self, nonce: bytes) -> list[GpuEvidence]:
        if len(nonce) != NONCE_SIZE:
            raise GpuEvidenceError(f"an SPDM nonce is {NONCE_SIZE} bytes, not {len(nonce)}")
        nvml = _nvml()
        with _lock:
            try:
                nvml.nvmlInit()
                try:
                    _check_cc_on(nvml)
                    return [self._one(nvml, i, nonce) for i in range(nvml.nvmlDeviceGetCount())]
                finally:
                    nvml.nvmlShutdown()
            except nvml.NVMLError as exc:
                raise GpuEvidenceError(f"NVML: {exc}") from None

    @staticmethod
    def _one(nvml: Any, index: int, nonce: bytes) -> GpuEvidence:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        if nvml.nvmlDeviceGetArchitecture(handle) != nvml.NVML_DEVICE_ARCH_HOPPER:
            raise GpuEvidenceError(f"GPU {index}: only Hopper evidence is supported")
        report = nvml.nvmlDeviceGetConfComputeGpuAttestationReport(handle, nonce)
        raw = bytes(report.attestationReport[: report.attestationReportSize])
        cert = nvml.nvmlDeviceGetConfComputeGpuCertificate(handle)
        pem = bytes(cert.attestationCertChain[: cert.attestationCertChainSize])
        return GpuEvidence(arch="HOPPER", report=raw, certificate_chain=_chain_der(pem))
