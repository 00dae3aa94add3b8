"""Pure, strict parser for a Hopper attestation report: SPDM 1.1 GET_MEASUREMENTS request||response.

The report is what NVIDIA's driver returns: the 37-byte request (holding our nonce) followed by
the MEASUREMENTS response (DMTF measurement blocks, the responder's nonce, NVIDIA's opaque-data
TLVs, and an ECDSA P-384 signature over everything before it). No trust decision is made here:
`signed_bytes` and `signature` are handed to `verify`. Every size, code and length must be exactly
what a Hopper GPU produces; trailing bytes, duplicates and unknown TLVs are refused.

Every failure raises `GpuEvidenceError`; arbitrary input never raises anything else.
Integers are little-endian (SPDM); the signature is raw big-endian r||s.
"""

from __future__ import annotations

from dataclasses import dataclass

from tdllm_attest.bytereader import ByteReader
from tdllm_attest.errors import GpuEvidenceError

MAX_REPORT_SIZE = 64 * 1024
NONCE_SIZE = 32
REQUEST_SIZE = 4 + NONCE_SIZE + 1  # version, code, param1, param2, nonce, slot id
SIGNATURE_SIZE = 96  # ECDSA P-384 r||s
FWID_SIZE = 48  # SHA-384

SPDM_VERSION_11 = 0x11
GET_MEASUREMENTS = 0xE0
MEASUREMENTS = 0x60
# Param1 bit 0: signature requested; Param2 0xFF: all measurement blocks; slot 0.
REQUEST_PARAM1_SIGNED = 0x01
REQUEST_PARAM2_ALL = 0xFF
SLOT_ID = 0
# In a response to "all blocks", Param1 is reserved and Param2 carries the slot (0).
RESPONSE_PARAM1 = 0x00
RESPONSE_PARAM2 = 0x00
MEASUREMENT_SPEC_DMTF = 0x01
DMTF_HEADER_SIZE = 3  # value type (1), value size (2)

# NVIDIA's opaque-data TLV types (nv-local-gpu-verifier / attestation-sdk names).
OPAQUE_CERT_ISSUER_NAME = 1
OPAQUE_CERT_AUTHORITY_KEY_IDENTIFIER = 2
OPAQUE_DRIVER_VERSION = 3
OPAQUE_GPU_INFO = 4
OPAQUE_SKU = 5
OPAQUE_VBIOS_VERSION = 6
OPAQUE_MANUFACTURER_ID = 7
OPAQUE_TAMPER_DETECTION = 8
OPAQUE_SMC = 9
OPAQUE_VPR = 10
OPAQUE_NVDEC0_STATUS = 11
OPAQUE_MSRSCNT = 12
OPAQUE_CPRINFO = 13
OPAQUE_BOARD_ID = 14
OPAQUE_CHIP_SKU = 15
OPAQUE_CHIP_SKU_MOD = 16
OPAQUE_PROJECT = 17
OPAQUE_PROJECT_SKU = 18
OPAQUE_PROJECT_SKU_MOD = 19
OPAQUE_FWID = 20
OPAQUE_PROTECTED_PCIE_STATUS = 21
OPAQUE_SWITCH_PDI = 22
OPAQUE_FLOORSWEPT_PORTS = 23
OPAQUE_POSITION_ID = 24
OPAQUE_LOCK_SWITCH_STATUS = 25
OPAQUE_GPU_LINK_CONN = 32
OPAQUE_SYS_ENABLE_STATUS = 33
OPAQUE_OPAQUE_DATA_VERSION = 34
OPAQUE_CHIP_INFO = 35
OPAQUE_FEATURE_FLAG = 36
KNOWN_OPAQUE_TYPES = frozenset({*range(1, 26), *range(32, 37)})

VBIOS_VERSION_SIZE = 8
STATUS_SIZE = 1
MSRSCNT_ELEMENT_SIZE = 4
SWITCH_PDI_SIZE = 8
MAX_INT_FIELD_SIZE = 8
# The newest opaque-data layout this parser knows (NVIDIA's SDK refuses newer ones too).
MAX_OPAQUE_DATA_VERSION = 1
FEATURE_FLAGS = {0: "SPT", 1: "MPT", 2: "PPCIE"}
NVDEC0_ENABLED = 0xAA
NVDEC0_DISABLED = 0x55
# Exact sizes of the fixed-size TLVs; variable ones are checked by their own parsers.
_FIXED_SIZES = {
    OPAQUE_VBIOS_VERSION: VBIOS_VERSION_SIZE,
    OPAQUE_FWID: FWID_SIZE,
    OPAQUE_NVDEC0_STATUS: STATUS_SIZE,
    OPAQUE_PROTECTED_PCIE_STATUS: STATUS_SIZE,
}


@dataclass(frozen=True)
class MeasurementBlock:
    """One DMTF measurement block; `index` is the SPDM block index (1-based)."""

    index: int
    value_type: int
    value: bytes


@dataclass(frozen=True)
class OpaqueFields:
    """NVIDIA's opaque data, decoded; `raw` keeps every TLV (type, value) in report order."""

    driver_version: str
    vbios_version: str  # "96.00.9f.00.01": lower-case, as NVIDIA compares it
    fwid: bytes | None
    feature_flag: str | None  # "SPT" | "MPT" | "PPCIE"; absent before opaque data version 1
    opaque_data_version: int  # 0 when the TLV is absent
    chip_info: str | None
    project: str
    project_sku: str
    chip_sku: str
    nvdec0_status: int | None
    raw: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True)
class GpuReport:
    """A parsed Hopper attestation report. `measurements`: SPDM block index -> value."""

    request_nonce: bytes
    responder_nonce: bytes
    spdm_version: int
    blocks: tuple[MeasurementBlock, ...]
    measurements: dict[int, bytes]
    opaque: OpaqueFields
    signed_bytes: bytes  # request || response without the signature
    signature: bytes  # raw r || s


def _reader(data: bytes, what: str) -> ByteReader:
    return ByteReader(data, error=GpuEvidenceError, subject=what)


def _expect(value: int, expected: int, what: str) -> None:
    if value != expected:
        raise GpuEvidenceError(f"GPU report: {what} is {value:#04x}, must be {expected:#04x}")


def _parse_request(r: ByteReader) -> tuple[int, bytes]:
    version = r.u8("request SPDM version")
    _expect(version, SPDM_VERSION_11, "request SPDM version")
    _expect(r.u8("request code"), GET_MEASUREMENTS, "request code (GET_MEASUREMENTS)")
    _expect(r.u8("request param1"), REQUEST_PARAM1_SIGNED, "request param1 (signature)")
    _expect(r.u8("request param2"), REQUEST_PARAM2_ALL, "request param2 (all blocks)")
    nonce = r.take(NONCE_SIZE, "request nonce")
    _expect(r.u8("request slot id"), SLOT_ID, "request slot id")
    return version, nonce


def _parse_blocks(record: bytes, count: int) -> tuple[MeasurementBlock, ...]:
    if count == 0:
        raise GpuEvidenceError("GPU report holds no measurement blocks")
    r = _reader(record, "GPU measurement record")
    blocks = []
    for expected_index in range(1, count + 1):
        index = r.u8("block index")
        # Blocks 1..N in order: NVIDIA's verifier reads block i as measurement i-1.
        if index != expected_index:
            raise GpuEvidenceError(
                f"GPU report: measurement block {index} where block {expected_index} belongs "
                "(blocks must be 1..N in order, without duplicates)"
            )
        _expect(r.u8("block measurement spec"), MEASUREMENT_SPEC_DMTF, f"block {index} spec")
        size = r.u16("block size")
        body = _reader(r.take(size, f"block {index}"), f"GPU measurement block {index}")
        value_type = body.u8("value type")
        value = body.take(body.u16("value size"), "value")
        if body.pos != body.end:
            raise GpuEvidenceError(f"GPU report: block {index} size disagrees with its value")
        blocks.append(MeasurementBlock(index, value_type, value))
    if r.pos != r.end:
        raise GpuEvidenceError("GPU report: measurement record longer than its blocks")
    return tuple(blocks)


def _ascii(data: bytes, what: str) -> str:
    """NUL-padded printable ASCII (NVIDIA strips the padding)."""
    text = data.rstrip(b"\0")
    if not all(0x20 <= b < 0x7F for b in text):
        raise GpuEvidenceError(f"GPU report: {what} is not NUL-padded printable ASCII")
    return text.decode("ascii")


def _uint(data: bytes, what: str) -> int:
    if not 0 < len(data) <= MAX_INT_FIELD_SIZE:
        raise GpuEvidenceError(f"GPU report: {what} has {len(data)} bytes, must be 1..8")
    return int.from_bytes(data, "little")


def vbios_version_string(raw: bytes) -> str:
    """NVIDIA's rendering of the 8-byte VBIOS version: "96.00.9f.00.01" (lower-case hex).

    The bytes are a little-endian u32 (the first four groups, most significant first) followed by
    the OEM byte; NVIDIA ignores the last three bytes, and so do we (they are signed all the same).
    """
    if len(raw) != VBIOS_VERSION_SIZE:
        raise GpuEvidenceError(f"GPU report: VBIOS version has {len(raw)} bytes, must be 8")
    return ".".join(f"{b:02x}" for b in (raw[3], raw[2], raw[1], raw[0], raw[4]))


def _parse_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    r = _reader(data, "GPU opaque data")
    tlvs: list[tuple[int, bytes]] = []
    seen: set[int] = set()
    while r.pos < r.end:
        kind = r.u16("opaque type")
        value = r.take(r.u16("opaque size"), f"opaque field {kind}")
        if kind not in KNOWN_OPAQUE_TYPES:
            raise GpuEvidenceError(f"GPU report: unknown opaque data type {kind}")
        if kind in seen:
            raise GpuEvidenceError(f"GPU report: opaque data type {kind} appears twice")
        expected = _FIXED_SIZES.get(kind)
        if expected is not None and len(value) != expected:
            raise GpuEvidenceError(
                f"GPU report: opaque field {kind} has {len(value)} bytes, must be {expected}"
            )
        seen.add(kind)
        tlvs.append((kind, value))
    return tuple(tlvs)


def _parse_opaque(data: bytes) -> OpaqueFields:
    tlvs = _parse_tlvs(data)
    fields = dict(tlvs)
    if len(fields.get(OPAQUE_MSRSCNT, b"")) % MSRSCNT_ELEMENT_SIZE:
        raise GpuEvidenceError("GPU report: measurement counts are not whole u32s")
    if len(fields.get(OPAQUE_SWITCH_PDI, b"")) % SWITCH_PDI_SIZE:
        raise GpuEvidenceError("GPU report: switch PDIs are not whole 8-byte entries")
    version = 0
    if OPAQUE_OPAQUE_DATA_VERSION in fields:
        version = _uint(fields[OPAQUE_OPAQUE_DATA_VERSION], "opaque data version")
        if version > MAX_OPAQUE_DATA_VERSION:
            raise GpuEvidenceError(f"GPU report: opaque data version {version} is not supported")
    feature_flag = None
    if OPAQUE_FEATURE_FLAG in fields:
        flag = _uint(fields[OPAQUE_FEATURE_FLAG], "feature flag")
        if flag not in FEATURE_FLAGS:
            raise GpuEvidenceError(f"GPU report: unknown feature flag {flag}")
        feature_flag = FEATURE_FLAGS[flag]
    if OPAQUE_DRIVER_VERSION not in fields or OPAQUE_VBIOS_VERSION not in fields:
        raise GpuEvidenceError("GPU report: opaque data lacks the driver or VBIOS version")
    driver = _ascii(fields[OPAQUE_DRIVER_VERSION], "driver version")
    if not driver:
        raise GpuEvidenceError("GPU report: empty driver version")
    nvdec = fields.get(OPAQUE_NVDEC0_STATUS)
    chip_info = fields.get(OPAQUE_CHIP_INFO)
    return OpaqueFields(
        driver_version=driver,
        vbios_version=vbios_version_string(fields[OPAQUE_VBIOS_VERSION]),
        fwid=fields.get(OPAQUE_FWID),
        feature_flag=feature_flag,
        opaque_data_version=version,
        chip_info=None if chip_info is None else _ascii(chip_info, "chip info"),
        project=_ascii(fields.get(OPAQUE_PROJECT, b""), "project"),
        project_sku=_ascii(fields.get(OPAQUE_PROJECT_SKU, b""), "project SKU"),
        chip_sku=_ascii(fields.get(OPAQUE_CHIP_SKU, b""), "chip SKU"),
        nvdec0_status=None if nvdec is None else nvdec[0],
        raw=tlvs,
    )


def parse_report(raw: bytes) -> GpuReport:
    """Parse a Hopper attestation report (request||response); `GpuEvidenceError` on any flaw."""
    if not isinstance(raw, bytes):
        raise GpuEvidenceError(f"GPU report must be bytes, not {type(raw).__name__}")
    if len(raw) > MAX_REPORT_SIZE:
        raise GpuEvidenceError(f"GPU report has {len(raw)} bytes, at most {MAX_REPORT_SIZE}")
    r = _reader(raw, "GPU report")
    version, request_nonce = _parse_request(r)
    _expect(r.u8("response SPDM version"), version, "response SPDM version")
    _expect(r.u8("response code"), MEASUREMENTS, "response code (MEASUREMENTS)")
    _expect(r.u8("response param1"), RESPONSE_PARAM1, "response param1")
    _expect(r.u8("response param2"), RESPONSE_PARAM2, "response param2 (slot)")
    count = r.u8("number of blocks")
    record_length = int.from_bytes(r.take(3, "measurement record length"), "little")
    blocks = _parse_blocks(r.take(record_length, "measurement record"), count)
    responder_nonce = r.take(NONCE_SIZE, "responder nonce")
    opaque = _parse_opaque(r.take(r.u16("opaque length"), "opaque data"))
    signed_end = r.pos
    signature = r.take(SIGNATURE_SIZE, "signature")
    if r.pos != len(raw):
        raise GpuEvidenceError(f"GPU report: {len(raw) - r.pos} trailing bytes after the signature")
    return GpuReport(
        request_nonce=request_nonce,
        responder_nonce=responder_nonce,
        spdm_version=version,
        blocks=blocks,
        measurements={b.index: b.value for b in blocks},
        opaque=opaque,
        signed_bytes=raw[:signed_end],
        signature=signature,
    )
