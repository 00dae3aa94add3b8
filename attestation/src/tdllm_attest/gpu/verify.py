"""Is this GPU evidence genuine? The device chain, the FWID binding and the report signature.

`verify_evidence` answers only "did a genuine NVIDIA Hopper GPU sign this report?": the chain of
five certificates must end in the pinned device root (never one taken from the evidence) and be
valid at `now`; the firmware ID in the leaf certificate must equal the one in the signed report
(as NVIDIA checks: the leaf key belongs to that firmware); the leaf key must have signed exactly
request || response-minus-signature with ECDSA P-384 / SHA-384. Nonce, versions and measurements
are `policy`'s job. Revocation (OCSP) is NOT checked: see the package docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tdllm_attest.clock import require_aware
from tdllm_attest.errors import GpuEvidenceError
from tdllm_attest.gpu.abi import FWID_SIZE, SIGNATURE_SIZE, GpuReport, parse_report
from tdllm_attest.gpu.anchors import GpuAnchors
from tdllm_attest.gpu.certs import load_der_chain, require_digital_signature, verify_chain
from tdllm_attest.gpu.evidence import ARCH_HOPPER, GpuEvidence

# Leaf (GSP FMC), GSP BROM, provisioner ICA, GH100 identity CA, device root: NVIDIA's count too.
HOPPER_CHAIN_LENGTH = 5
# TCG DICE TcbInfo; NVIDIA's verifier accepts either arc for the FWID extension.
FWID_EXTENSION_OIDS = frozenset(
    {x509.ObjectIdentifier("2.23.133.5.4.1"), x509.ObjectIdentifier("2.23.133.5.4.1.1")}
)
_SHA384_OID = (0x06, bytes.fromhex("608648016503040202"))  # OID 2.16.840.1.101.3.4.2.2
_SEQUENCE = 0x30
_OCTET_STRING = 0x04


@dataclass(frozen=True)
class VerifiedGpuReport:
    """A report whose chain and signature verified; `simulated` when under test anchors."""

    arch: str
    report: GpuReport
    fwid: bytes
    leaf_public_key: bytes  # DER SubjectPublicKeyInfo: tells GPUs apart
    simulated: bool


def _der_items(data: bytes, what: str) -> list[tuple[int, bytes]]:
    """Split DER into (tag, content) items; definite lengths only, nothing left over."""
    items, pos = [], 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise GpuEvidenceError(f"{what}: truncated DER")
        tag, first = data[pos], data[pos + 1]
        pos += 2
        if first < 0x80:
            length = first
        else:
            size = first & 0x7F
            if not 1 <= size <= 2 or pos + size > len(data):
                raise GpuEvidenceError(f"{what}: unsupported DER length")
            length = int.from_bytes(data[pos : pos + size], "big")
            pos += size
        if pos + length > len(data):
            raise GpuEvidenceError(f"{what}: truncated DER")
        items.append((tag, data[pos : pos + length]))
        pos += length
    return items


def leaf_fwid(leaf: x509.Certificate) -> bytes:
    """The SHA-384 firmware ID in the leaf's TCG DICE extension.

    The extension is a SEQUENCE whose last element is SEQUENCE { sha384 OID, OCTET STRING(48) };
    NVIDIA takes the extension's last 48 bytes, which is the same value on well-formed input.
    """
    what = "GPU leaf FWID extension"
    found = [e for e in leaf.extensions if e.oid in FWID_EXTENSION_OIDS]
    if len(found) != 1 or not isinstance(found[0].value, x509.UnrecognizedExtension):
        raise GpuEvidenceError(f"{what}: the leaf must carry exactly one")
    outer = _der_items(found[0].value.value, what)
    if len(outer) != 1 or outer[0][0] != _SEQUENCE:
        raise GpuEvidenceError(f"{what}: not one DER SEQUENCE")
    fields = _der_items(outer[0][1], what)
    if not fields or fields[-1][0] != _SEQUENCE:
        raise GpuEvidenceError(f"{what}: no FWID entry")
    entry = _der_items(fields[-1][1], what)
    if (
        len(entry) != 2
        or entry[0] != _SHA384_OID
        or entry[1][0] != _OCTET_STRING
        or len(entry[1][1]) != FWID_SIZE
    ):
        raise GpuEvidenceError(f"{what}: the FWID entry is not a SHA-384 digest")
    return entry[1][1]


def _check_signature(report: GpuReport, leaf: x509.Certificate) -> None:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise GpuEvidenceError("GPU report: the leaf key is not ECDSA P-384")
    half = SIGNATURE_SIZE // 2
    r = int.from_bytes(report.signature[:half], "big")
    s = int.from_bytes(report.signature[half:], "big")
    try:
        key.verify(encode_dss_signature(r, s), report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise GpuEvidenceError("GPU report: signature does not verify under the leaf key") from None


def verify_evidence(
    evidence: GpuEvidence, *, anchors: GpuAnchors, now: datetime
) -> VerifiedGpuReport:
    """Verify one GPU's evidence at `now`; raise `GpuEvidenceError` on any failure."""
    now = require_aware(now)
    if evidence.arch != ARCH_HOPPER:
        raise GpuEvidenceError(f"GPU architecture {evidence.arch!r} is not supported")
    certs = load_der_chain(evidence.certificate_chain, "GPU device chain")
    verify_chain(
        certs, anchors.device_root_der, now, what="GPU device chain", length=HOPPER_CHAIN_LENGTH
    )
    leaf = certs[0]
    require_digital_signature(leaf, "GPU device chain")
    report = parse_report(evidence.report)
    fwid = leaf_fwid(leaf)
    if report.opaque.fwid is None:
        # NVIDIA skips this check for firmware without the field; we refuse such reports.
        raise GpuEvidenceError("GPU report carries no FWID to bind it to the leaf certificate")
    if report.opaque.fwid != fwid:
        raise GpuEvidenceError(
            f"GPU report FWID {report.opaque.fwid.hex()} differs from the leaf's {fwid.hex()}"
        )
    _check_signature(report, leaf)
    return VerifiedGpuReport(
        arch=evidence.arch,
        report=report,
        fwid=fwid,
        leaf_public_key=leaf.public_key().public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo
        ),
        simulated=not anchors.is_nvidia,
    )
