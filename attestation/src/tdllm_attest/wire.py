"""The byte forms that get signed, MACed or hashed into REPORTDATA, defined once for both
distributions: every signer and every verifier must produce exactly the same bytes.

`canonical_json`: sorted keys, no whitespace, UTF-8 without escaping (RFC 8785 for the value
types we use: strings, integers, booleans, null, lists, objects). NaN and the infinities are
refused, since JSON has no such values and implementations spell them differently.
`b64url` / `from_b64url`: unpadded base64url (RFC 7515 section 2), strict on the way in: the one
decoder of the project, which takes only the canonical text `b64url` writes.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def canonical_json(value: Any) -> bytes:
    """The one byte form of `value` that is signed, MACed or bound; ValueError on NaN/inf."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def from_b64url(text: str) -> bytes:
    """Decode unpadded base64url in its one canonical spelling; ValueError on anything else.

    Only the alphabet ``A-Z a-z 0-9 - _``: no padding, no ``+`` or ``/``, no whitespace. And the
    text must be what `b64url` gives for the bytes it decodes to: base64 decoders ignore the
    unused low bits of the last character, so without that check a flipped bit there would decode
    to the same bytes, and a signed or sealed text would have more than one spelling.
    """
    if not isinstance(text, str) or _B64URL.fullmatch(text) is None:
        raise ValueError("not unpadded base64url text")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None
    if b64url(data) != text:
        raise ValueError("not canonical base64url (nonzero unused bits in the last character)")
    return data
