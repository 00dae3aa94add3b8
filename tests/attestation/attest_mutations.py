"""Byte-level helpers to build broken variants of real quotes (offsets from tdllm_attest.abi)."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tdllm_attest.abi import Quote, parse_quote
from tdllm_attest.collateral import Collateral, load_collateral

# Pinned times: within 24 hours of every issue date of the vector's collateral, so that the
# default freshness limit (24 h since issue) holds; the SPR E4 collateral's parts were issued ten
# days apart, so its tests lift the age limit explicitly (it is refused for its TCB anyway).
V4_AT = datetime(2025, 6, 19, 12, tzinfo=UTC)
V5_AT = datetime(2026, 2, 18, 12, tzinfo=UTC)
SPR_E4_AT = datetime(2023, 7, 1, tzinfo=UTC)
REAL_NOW = datetime(2026, 11, 23, tzinfo=UTC)


@dataclass(frozen=True)
class Vector:
    """A real quote, its collateral file and the time at which that collateral is current."""

    name: str
    quote: bytes
    collateral_path: Path
    at: datetime

    @property
    def collateral(self) -> Collateral:
        return load_collateral(self.collateral_path)


SIG_OFF = 4  # signature data starts after its 4-byte length


def sig_data_offset(quote: Quote) -> int:
    """Absolute offset of the signature data (after the 4-byte length)."""
    return quote.signed_end + SIG_OFF


def offsets(raw: bytes) -> dict[str, int]:
    """Absolute offsets of the signature-data fields of a real quote."""
    q = parse_quote(raw)
    s = sig_data_offset(q)
    auth = struct.unpack_from("<H", raw, s + 582)[0]
    return {
        "sig_len": q.signed_end,
        "quote_signature": s,
        "attestation_key": s + 64,
        "outer_type": s + 128,
        "outer_size": s + 130,
        "qe_report": s + 134,
        "qe_report_signature": s + 518,
        "auth_size": s + 582,
        "auth_data": s + 584,
        "inner_type": s + 584 + auth,
        "inner_size": s + 586 + auth,
        "pem": s + 590 + auth,
    }


def put(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value) :]


def u16(v: int) -> bytes:
    return struct.pack("<H", v)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def raw_sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def resign_with_fresh_ak(raw: bytes, *, rebind: bool) -> bytes:
    """Sign header+body with a new attestation key; optionally patch the QE report-data too
    (which then breaks the PCK signature over the QE report)."""
    q = parse_quote(raw)
    o = offsets(raw)
    key = ec.generate_private_key(ec.SECP256R1())
    nums = key.public_key().public_numbers()
    ak = nums.x.to_bytes(32, "big") + nums.y.to_bytes(32, "big")
    out = put(raw, o["attestation_key"], ak)
    out = put(out, o["quote_signature"], raw_sign(key, q.signed_region))
    if rebind:
        digest = hashlib.sha256(ak + q.signature_data.qe_auth_data).digest() + bytes(32)
        out = put(out, o["qe_report"] + 320, digest)
    return out


def replace_pem(raw: bytes, pem: bytes) -> bytes:
    """Swap the embedded PEM chain, fixing every enclosing length field."""
    o = offsets(raw)
    q = parse_quote(raw)
    head = raw[: o["pem"]]
    old_pem_len = len(q.signature_data.pck_chain.pem)
    delta = len(pem) - old_pem_len
    head = put(head, o["inner_size"], u32(len(pem)))
    outer = struct.unpack_from("<I", raw, o["outer_size"])[0]
    head = put(head, o["outer_size"], u32(outer + delta))
    sig_len = struct.unpack_from("<I", raw, o["sig_len"])[0]
    head = put(head, o["sig_len"], u32(sig_len + delta))
    return head + pem
