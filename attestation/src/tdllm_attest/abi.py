"""Pure, strict parser for Intel TDX quotes v4 and v5 (TD report 1.0 and 1.5).

No trust decisions are made here, only framing: every size, type and length field must be exactly
what Intel's TD Quoting Enclave produces, and the embedded PEM chain must be the canonical encoding
of exactly three certificates. Framing is strict because dcap-qvl ignores several unauthenticated
bytes (outer certification type, PEM line breaks, trailing bytes); see docs/attestation.md.

Every failure raises `QuoteParseError`; arbitrary input never raises anything else.
All integers are little-endian; ECDSA values are raw big-endian r||s and x||y halves.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tdllm_attest import memo
from tdllm_attest.bytereader import ByteReader
from tdllm_attest.errors import QuoteParseError

# Header (48 bytes, same in v4 and v5).
HEADER_SIZE = 48
VERSION_SIZE = 2
ATTESTATION_KEY_TYPE_SIZE = 2
TEE_TYPE_SIZE = 4
QE_SVN_SIZE = 2
PCE_SVN_SIZE = 2
QE_VENDOR_ID_SIZE = 16
USER_DATA_SIZE = 20

QUOTE_VERSION_4 = 4
QUOTE_VERSION_5 = 5
ATTESTATION_KEY_TYPE_ECDSA_P256 = 2
TEE_TYPE_TDX = 0x00000081
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

# v5 body descriptor.
BODY_TYPE_SIZE = 2
BODY_SIZE_SIZE = 4
BODY_TYPE_TD_REPORT_10 = 2
BODY_TYPE_TD_REPORT_15 = 3

# TD report fields.
TEE_TCB_SVN_SIZE = 16
MR_SEAM_SIZE = 48
MR_SIGNER_SEAM_SIZE = 48
SEAM_ATTRIBUTES_SIZE = 8
TD_ATTRIBUTES_SIZE = 8
XFAM_SIZE = 8
MR_TD_SIZE = 48
MR_CONFIG_ID_SIZE = 48
MR_OWNER_SIZE = 48
MR_OWNER_CONFIG_SIZE = 48
RTMR_SIZE = 48
RTMR_COUNT = 4
REPORT_DATA_SIZE = 64
TEE_TCB_SVN2_SIZE = 16
MR_SERVICE_TD_SIZE = 48
TD_REPORT_10_SIZE = 584
TD_REPORT_15_SIZE = TD_REPORT_10_SIZE + TEE_TCB_SVN2_SIZE + MR_SERVICE_TD_SIZE  # 648

# Signature data.
SIGNATURE_DATA_LEN_SIZE = 4
ECDSA_SIGNATURE_SIZE = 64
ECDSA_PUBLIC_KEY_SIZE = 64
CERTIFICATION_DATA_TYPE_SIZE = 2
CERTIFICATION_DATA_SIZE_SIZE = 4
CERT_TYPE_QE_REPORT_CERTIFICATION_DATA = 6
CERT_TYPE_PCK_CERT_CHAIN = 5
QE_REPORT_SIZE = 384
QE_AUTH_DATA_SIZE_SIZE = 2
QE_AUTH_DATA_SIZE = 32  # Intel's TD QE always sends 32 bytes; anything else is rejected.
PCK_CHAIN_LENGTH = 3

# QE report (SGX REPORT BODY) field offsets.
QE_CPU_SVN_SIZE = 16
QE_MISC_SELECT_OFFSET = 16
QE_ATTRIBUTES_OFFSET = 48
QE_ATTRIBUTES_SIZE = 16
QE_MR_ENCLAVE_OFFSET = 64
QE_MR_ENCLAVE_SIZE = 32
QE_MR_SIGNER_OFFSET = 128
QE_MR_SIGNER_SIZE = 32
QE_ISV_PROD_ID_OFFSET = 256
QE_ISV_SVN_OFFSET = 258
QE_REPORT_DATA_OFFSET = 320
QE_REPORT_DATA_SIZE = 64

# Bounds: kernel buffers are padded, but a quote larger than this is not one we support
# (Linux documents a CBOR Web Token format above 8 KiB for DICE platforms).
MAX_QUOTE_BUFFER_SIZE = 32 * 1024
MAX_QUOTE_SIZE = 8 * 1024

# TD attribute bits (TDX module ABI, TDATTRIBUTES).
TD_ATTRIBUTE_DEBUG = 1 << 0
TD_ATTRIBUTE_SEPT_VE_DISABLE = 1 << 28
TD_ATTRIBUTE_PKS = 1 << 30
TD_ATTRIBUTE_KL = 1 << 31
TD_ATTRIBUTE_PERFMON = 1 << 63
TD_ATTRIBUTES_RESERVED_MASK = ~(
    TD_ATTRIBUTE_DEBUG
    | TD_ATTRIBUTE_SEPT_VE_DISABLE
    | TD_ATTRIBUTE_PKS
    | TD_ATTRIBUTE_KL
    | TD_ATTRIBUTE_PERFMON
) & ((1 << 64) - 1)

PEM_NUL_TERMINATOR = b"\x00"


@dataclass(frozen=True)
class QuoteHeader:
    """The 48-byte quote header."""

    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class TdReport10:
    """TD quote body, TD report 1.0 (584 bytes)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes

    @property
    def td_attributes_value(self) -> int:
        """TDATTRIBUTES as a 64-bit integer (little-endian in the quote)."""
        return int.from_bytes(self.td_attributes, "little")

    @property
    def debug(self) -> bool:
        """The DEBUG attribute: the host can read and modify TD state."""
        return bool(self.td_attributes_value & TD_ATTRIBUTE_DEBUG)

    @property
    def sept_ve_disable(self) -> bool:
        """The SEPT_VE_DISABLE attribute (must be set for a hardened guest)."""
        return bool(self.td_attributes_value & TD_ATTRIBUTE_SEPT_VE_DISABLE)

    def registers(self) -> dict[str, bytes]:
        """Every measurement register and identity field, by spec name."""
        return {
            "mr_td": self.mr_td,
            "rtmr0": self.rtmr[0],
            "rtmr1": self.rtmr[1],
            "rtmr2": self.rtmr[2],
            "rtmr3": self.rtmr[3],
            "mr_config_id": self.mr_config_id,
            "mr_owner": self.mr_owner,
            "mr_owner_config": self.mr_owner_config,
            "mr_seam": self.mr_seam,
            "mr_signer_seam": self.mr_signer_seam,
            "seam_attributes": self.seam_attributes,
            "td_attributes": self.td_attributes,
            "xfam": self.xfam,
            "tee_tcb_svn": self.tee_tcb_svn,
            "report_data": self.report_data,
        }


@dataclass(frozen=True)
class TdReport15(TdReport10):
    """TD quote body, TD report 1.5 (648 bytes): adds TEE_TCB_SVN2 and MRSERVICETD."""

    tee_tcb_svn2: bytes
    mr_service_td: bytes

    def registers(self) -> dict[str, bytes]:
        regs = super().registers()
        regs["tee_tcb_svn2"] = self.tee_tcb_svn2
        regs["mr_service_td"] = self.mr_service_td
        return regs


@dataclass(frozen=True)
class QeReport:
    """The Quoting Enclave's SGX report body (384 bytes), signed by the PCK leaf key."""

    raw: bytes
    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes


@dataclass(frozen=True)
class PckCertChain:
    """The PCK certificate chain (leaf, intermediate CA, root) from certification data type 5."""

    pem: bytes
    certificates_der: tuple[bytes, bytes, bytes]

    @property
    def leaf_der(self) -> bytes:
        return self.certificates_der[0]

    @property
    def intermediate_der(self) -> bytes:
        return self.certificates_der[1]

    @property
    def root_der(self) -> bytes:
        return self.certificates_der[2]


@dataclass(frozen=True)
class SignatureData:
    """The quote's signature data: AK signature and key, QE report and the PCK chain."""

    quote_signature: bytes
    attestation_key: bytes
    qe_report: QeReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain: PckCertChain


@dataclass(frozen=True)
class Quote:
    """A parsed TDX quote. `raw` excludes any trailing zero padding of the input buffer."""

    header: QuoteHeader
    body_type: int
    td_report: TdReport10
    signature_data: SignatureData
    raw: bytes
    signed_end: int
    trailing_padding: int

    @property
    def signed_region(self) -> bytes:
        """Bytes covered by the attestation key's signature (header and body)."""
        return self.raw[: self.signed_end]


def _quote_reader(data: bytes, offset: int = 0, end: int | None = None) -> ByteReader:
    return ByteReader(data, offset, end, error=QuoteParseError, subject="quote")


def _parse_header(r: ByteReader) -> QuoteHeader:
    header = QuoteHeader(
        version=r.u16("version"),
        attestation_key_type=r.u16("attestation_key_type"),
        tee_type=r.u32("tee_type"),
        qe_svn=r.u16("qe_svn"),
        pce_svn=r.u16("pce_svn"),
        qe_vendor_id=r.take(QE_VENDOR_ID_SIZE, "qe_vendor_id"),
        user_data=r.take(USER_DATA_SIZE, "user_data"),
    )
    if header.version not in (QUOTE_VERSION_4, QUOTE_VERSION_5):
        raise QuoteParseError(f"unsupported quote version {header.version} (want 4 or 5)")
    if header.attestation_key_type != ATTESTATION_KEY_TYPE_ECDSA_P256:
        raise QuoteParseError(
            f"unsupported attestation key type {header.attestation_key_type} (want 2, ECDSA-P256)"
        )
    if header.tee_type != TEE_TYPE_TDX:
        raise QuoteParseError(f"TEE type {header.tee_type:#x} is not TDX (0x81)")
    if header.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise QuoteParseError(f"QE vendor ID {header.qe_vendor_id.hex()} is not Intel's")
    return header


def _parse_td_report(r: ByteReader, body_type: int) -> TdReport10:
    fields = {
        "tee_tcb_svn": r.take(TEE_TCB_SVN_SIZE, "tee_tcb_svn"),
        "mr_seam": r.take(MR_SEAM_SIZE, "mr_seam"),
        "mr_signer_seam": r.take(MR_SIGNER_SEAM_SIZE, "mr_signer_seam"),
        "seam_attributes": r.take(SEAM_ATTRIBUTES_SIZE, "seam_attributes"),
        "td_attributes": r.take(TD_ATTRIBUTES_SIZE, "td_attributes"),
        "xfam": r.take(XFAM_SIZE, "xfam"),
        "mr_td": r.take(MR_TD_SIZE, "mr_td"),
        "mr_config_id": r.take(MR_CONFIG_ID_SIZE, "mr_config_id"),
        "mr_owner": r.take(MR_OWNER_SIZE, "mr_owner"),
        "mr_owner_config": r.take(MR_OWNER_CONFIG_SIZE, "mr_owner_config"),
    }
    rtmr = (
        r.take(RTMR_SIZE, "rtmr0"),
        r.take(RTMR_SIZE, "rtmr1"),
        r.take(RTMR_SIZE, "rtmr2"),
        r.take(RTMR_SIZE, "rtmr3"),
    )
    report_data = r.take(REPORT_DATA_SIZE, "report_data")
    if body_type == BODY_TYPE_TD_REPORT_15:
        return TdReport15(
            **fields,
            rtmr=rtmr,
            report_data=report_data,
            tee_tcb_svn2=r.take(TEE_TCB_SVN2_SIZE, "tee_tcb_svn2"),
            mr_service_td=r.take(MR_SERVICE_TD_SIZE, "mr_service_td"),
        )
    return TdReport10(**fields, rtmr=rtmr, report_data=report_data)


def _parse_qe_report(raw: bytes) -> QeReport:
    def u16_at(offset: int) -> int:
        value: int = struct.unpack_from("<H", raw, offset)[0]
        return value

    misc_select: int = struct.unpack_from("<I", raw, QE_MISC_SELECT_OFFSET)[0]
    return QeReport(
        raw=raw,
        cpu_svn=raw[:QE_CPU_SVN_SIZE],
        misc_select=misc_select,
        attributes=raw[QE_ATTRIBUTES_OFFSET : QE_ATTRIBUTES_OFFSET + QE_ATTRIBUTES_SIZE],
        mr_enclave=raw[QE_MR_ENCLAVE_OFFSET : QE_MR_ENCLAVE_OFFSET + QE_MR_ENCLAVE_SIZE],
        mr_signer=raw[QE_MR_SIGNER_OFFSET : QE_MR_SIGNER_OFFSET + QE_MR_SIGNER_SIZE],
        isv_prod_id=u16_at(QE_ISV_PROD_ID_OFFSET),
        isv_svn=u16_at(QE_ISV_SVN_OFFSET),
        report_data=raw[QE_REPORT_DATA_OFFSET : QE_REPORT_DATA_OFFSET + QE_REPORT_DATA_SIZE],
    )


def parse_pck_chain(pem: bytes) -> PckCertChain:
    """Parse the embedded PEM chain; it must be the canonical PEM of exactly three certificates.

    Intel's QE appends one NUL byte; that single NUL is the only tolerated extra byte. The result
    is a pure function of `pem`, so accepted chains are remembered (quotes of one platform share
    one chain); a rejected chain is parsed, and rejected, again each time.
    """
    return _pck_chains.get_or_compute(pem, lambda: _parse_pck_chain(pem))


_pck_chains: memo.BoundedCache[bytes, PckCertChain] = memo.BoundedCache()


def _parse_pck_chain(pem: bytes) -> PckCertChain:
    body = pem[:-1] if pem.endswith(PEM_NUL_TERMINATOR) else pem
    try:
        # cryptography warns (instead of failing) on some malformed attributes; strict framing
        # treats any such warning as a parse error.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            certs = x509.load_pem_x509_certificates(body)
            for cert in certs:  # cryptography parses lazily: force every field verification reads
                _ = (cert.subject, cert.issuer, cert.not_valid_before_utc, cert.not_valid_after_utc)
                _ = (
                    cert.version,
                    cert.extensions,
                    cert.public_key(),
                    cert.signature_hash_algorithm,
                )
            canonical = b"".join(c.public_bytes(Encoding.PEM) for c in certs)
            ders = [c.public_bytes(Encoding.DER) for c in certs]
    except Exception as exc:  # cryptography raises ValueError, TypeError, InvalidVersion,
        # DuplicateExtension... for malformed DER: all of them mean "not a valid chain"
        raise QuoteParseError(f"PCK certificate chain is not valid PEM: {exc}") from None
    if caught:
        raise QuoteParseError(f"PCK certificate chain is malformed: {caught[0].message}")
    if len(certs) != PCK_CHAIN_LENGTH:
        raise QuoteParseError(
            f"PCK certificate chain has {len(certs)} certificates, want exactly {PCK_CHAIN_LENGTH}"
        )
    if canonical != body:
        raise QuoteParseError("PCK certificate chain is not canonical PEM (extra bytes or layout)")
    return PckCertChain(pem=pem, certificates_der=(ders[0], ders[1], ders[2]))


def _parse_signature_data(r: ByteReader) -> SignatureData:
    quote_signature = r.take(ECDSA_SIGNATURE_SIZE, "quote signature")
    attestation_key = r.take(ECDSA_PUBLIC_KEY_SIZE, "attestation key")
    outer_type = r.u16("certification data type")
    if outer_type != CERT_TYPE_QE_REPORT_CERTIFICATION_DATA:
        raise QuoteParseError(
            f"certification data type {outer_type}, want {CERT_TYPE_QE_REPORT_CERTIFICATION_DATA}"
            " (QE report certification data)"
        )
    outer_size = r.u32("certification data size")
    if outer_size != r.end - r.pos:
        raise QuoteParseError(
            f"certification data size {outer_size} does not match the {r.end - r.pos} bytes left"
        )
    qe_report = _parse_qe_report(r.take(QE_REPORT_SIZE, "QE report"))
    qe_report_signature = r.take(ECDSA_SIGNATURE_SIZE, "QE report signature")
    auth_size = r.u16("QE authentication data size")
    if auth_size != QE_AUTH_DATA_SIZE:
        raise QuoteParseError(f"QE authentication data size {auth_size}, want {QE_AUTH_DATA_SIZE}")
    qe_auth_data = r.take(auth_size, "QE authentication data")
    inner_type = r.u16("inner certification data type")
    if inner_type != CERT_TYPE_PCK_CERT_CHAIN:
        raise QuoteParseError(
            f"inner certification data type {inner_type}, want {CERT_TYPE_PCK_CERT_CHAIN}"
            " (PCK certificate chain)"
        )
    inner_size = r.u32("PCK chain size")
    if inner_size != r.end - r.pos:
        raise QuoteParseError(
            f"PCK chain size {inner_size} does not match the {r.end - r.pos} bytes left"
        )
    pck_chain = parse_pck_chain(r.take(inner_size, "PCK certificate chain"))
    return SignatureData(
        quote_signature=quote_signature,
        attestation_key=attestation_key,
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        pck_chain=pck_chain,
    )


def parse_quote(data: bytes) -> Quote:
    """Parse a TDX quote (v4 or v5) strictly.

    Trailing zero bytes after the declared signature data are accepted (kernel buffers are
    padded); any other trailing byte, and any deviation in sizes or types, raises
    `QuoteParseError`.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise QuoteParseError(f"quote must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_QUOTE_BUFFER_SIZE:
        raise QuoteParseError(f"quote buffer of {len(data)} bytes exceeds {MAX_QUOTE_BUFFER_SIZE}")
    r = _quote_reader(data)
    header = _parse_header(r)
    if header.version == QUOTE_VERSION_4:
        body_type = BODY_TYPE_TD_REPORT_10
    else:
        body_type = r.u16("body type")
        body_size = r.u32("body size")
        want = {
            BODY_TYPE_TD_REPORT_10: TD_REPORT_10_SIZE,
            BODY_TYPE_TD_REPORT_15: TD_REPORT_15_SIZE,
        }
        if body_type not in want:
            raise QuoteParseError(f"unsupported v5 body type {body_type} (want 2 or 3)")
        if body_size != want[body_type]:
            raise QuoteParseError(
                f"v5 body size {body_size} does not match body type {body_type} "
                f"({want[body_type]} bytes)"
            )
    td_report = _parse_td_report(r, body_type)
    signed_end = r.pos
    sig_len = r.u32("signature data length")
    sig_end = r.pos + sig_len
    if sig_end > len(data):
        raise QuoteParseError(
            f"signature data length {sig_len} runs past the end of the quote ({len(data)} bytes)"
        )
    if sig_end > MAX_QUOTE_SIZE:
        raise QuoteParseError(f"quote of {sig_end} bytes exceeds {MAX_QUOTE_SIZE}")
    signature_data = _parse_signature_data(_quote_reader(data, r.pos, sig_end))
    trailing = data[sig_end:]
    if trailing.strip(b"\x00"):
        raise QuoteParseError(
            f"{len(trailing)} trailing bytes after the signature data are not all zero"
        )
    return Quote(
        header=header,
        body_type=body_type,
        td_report=td_report,
        signature_data=signature_data,
        raw=data[:sig_end],
        signed_end=signed_end,
        trailing_padding=len(trailing),
    )
