"""A recipient entry's JWE opens only in the one spelling it was written in.

jwcrypto's own base64url decoder is lenient (it takes '+', '/', padding, and ignores the unused
bits of a part's last character), so each of these respellings would open the same data key
without `recipients` refusing every part that `from_b64url` refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tdllm.sealing.recipients import generate_key_pair, unwrap_data_key, wrap_data_key

MODEL_ID = "ab" * 16
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
TAG = 4  # the last of the five parts: a 16-byte tag, 22 characters, 4 unused bits


@pytest.fixture(scope="module")
def key() -> Any:
    return generate_key_pair("X25519")


def entry(key: Any) -> dict[str, str]:
    """An entry whose JWE has a '-' or '_' somewhere (a ~1 in 25,000 miss is retried)."""
    for _ in range(10):
        wrapped = wrap_data_key(bytes(range(32)), key, MODEL_ID, "key-1")
        if any(c in wrapped["jwe"].replace(".", "") for c in "-_"):
            return wrapped
    raise AssertionError("ten JWEs without a '-' or '_'")


def respell(compact: str, index: int, change: Callable[[str], str]) -> str:
    parts = compact.split(".")
    parts[index] = change(parts[index])
    return ".".join(parts)


def nonzero_unused_bits(part: str) -> str:
    assert len(part) % 4 in (2, 3)
    return part[:-1] + ALPHABET[ALPHABET.index(part[-1]) ^ 1]


def standard_alphabet(compact: str) -> str:
    return compact.replace("-", "+").replace("_", "/")


def test_the_written_spelling_opens(key: Any) -> None:
    assert unwrap_data_key([entry(key)], key, MODEL_ID) == bytearray(range(32))


@pytest.mark.parametrize(
    "spell",
    [
        lambda jwe: respell(jwe, TAG, nonzero_unused_bits),
        lambda jwe: respell(jwe, TAG, lambda part: part + "=" * (-len(part) % 4)),
        standard_alphabet,
    ],
    ids=["non-canonical last character", "padding", "'+' and '/'"],
)
def test_any_other_spelling_of_the_same_jwe_is_refused(
    key: Any, spell: Callable[[str], str]
) -> None:
    written = entry(key)
    other = written | {"jwe": spell(written["jwe"])}
    assert other["jwe"] != written["jwe"]
    with pytest.raises(ValueError, match="no recipient entry opens"):
        unwrap_data_key([other], key, MODEL_ID)
