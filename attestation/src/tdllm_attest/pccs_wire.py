"""How PCCS / PCS v4 answers are read: signed JSON objects cut out byte-exact, CRLs in any of
the encodings servers send, URL-encoded issuer chains. Pure functions, no I/O (`pccs` fetches)."""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

HEX = re.compile(rb"(?:[0-9a-fA-F]{2})+")  # whole bytes of hex text
_JSON_WS = re.compile(r"[ \t\n\r]*")
_PEM_CRL = b"-----BEGIN X509 CRL-----"


def _skip_ws(text: str, pos: int) -> int:
    match = _JSON_WS.match(text, pos)
    return match.end() if match else pos


def _expect(text: str, pos: int, char: str) -> int:
    if not text.startswith(char, pos):
        raise ValueError(f"expected {char!r} at offset {pos}")
    return _skip_ws(text, pos + 1)


def json_members(body: str) -> dict[str, tuple[Any, str]]:
    """Top-level members of the JSON object `body`: name -> (value, exact text of the value).

    Strict: the whole body must be one JSON object, with no duplicate names (a signed text
    chosen among duplicates would be ambiguous). Raises ValueError otherwise.
    """
    decoder = json.JSONDecoder()
    members: dict[str, tuple[Any, str]] = {}
    pos = _expect(body, _skip_ws(body, 0), "{")
    closed = body.startswith("}", pos)
    while not closed:
        name, pos = decoder.raw_decode(body, pos)
        if not isinstance(name, str) or name in members:
            raise ValueError(f"member name {name!r} is not a string or is duplicated")
        start = pos = _expect(body, _skip_ws(body, pos), ":")
        value, pos = decoder.raw_decode(body, pos)
        members[name] = (value, body[start:pos])
        pos = _skip_ws(body, pos)
        closed = body.startswith("}", pos)
        if not closed:
            pos = _expect(body, pos, ",")
    if _skip_ws(body, pos + 1) != len(body):
        raise ValueError("data after the JSON object")
    return members


def signed_object_text(body: str, key: str) -> tuple[str, str]:
    """(exact text of the `key` object, hex signature) from a PCS response body.

    The signature covers the object's bytes as served, so its text is cut out, not re-encoded.
    """
    members = json_members(body)
    if key not in members or not isinstance(members[key][0], dict):
        raise ValueError(f"no {key!r} object")
    signature = members.get("signature", (None, ""))[0]
    if not isinstance(signature, str):
        raise ValueError("no 'signature' string")
    return members[key][1], signature


def crl_der(body: bytes) -> bytes:
    """A CRL as DER, from DER, PEM or hex text (PCCS sends hex; PCS DER or PEM)."""
    stripped = body.strip()
    if stripped.startswith(_PEM_CRL):
        der = x509.load_pem_x509_crl(stripped).public_bytes(Encoding.DER)
    elif HEX.fullmatch(stripped):
        der = bytes.fromhex(stripped.decode("ascii"))
    else:
        der = body  # DER may end in whitespace-valued bytes: never strip it
    x509.load_der_x509_crl(der)  # raises ValueError when it is not a CRL
    return der


def issuer_chain_pem(value: str) -> str:
    """PEM text of a URL-encoded issuer-chain header; ValueError unless it holds certificates."""
    # unquote, not unquote_plus: a literal '+' is base64, not a space
    pem = urllib.parse.unquote(value, errors="strict")
    x509.load_pem_x509_certificates(pem.encode("ascii"))
    return pem
