"""`tdllm_attest.wire`: the one canonical JSON and base64url that everything signs, MACs or binds.

The expected bytes below were produced by the copies this module replaced (tdllm.api.identity,
tdllm_attest.policy, tdllm.sealing.format), so a change here would break every signature,
sealed manifest and attestation made before it.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from pathlib import Path

import pytest

from tdllm_attest.broker.protocol import report_data_for, runtime_data
from tdllm_attest.client.binding import ServiceClaims, okp_jwk, report_data
from tdllm_attest.client.e2e_protocol import signed_bytes
from tdllm_attest.wire import b64url, canonical_json, from_b64url

REPO = Path(__file__).resolve().parents[2]
DOCUMENT = {
    "z": [1, 2.5, None, True, 'ü\n"', {"b": 1, "a": -0.0}],
    "a": {"é": "€"},
    "n": 10**20,
}
DOCUMENT_BYTES = (
    b'{"a":{"\xc3\xa9":"\xe2\x82\xac"},"n":100000000000000000000,'
    b'"z":[1,2.5,null,true,"\xc3\xbc\\n\\"",{"a":-0.0,"b":1}]}'
)


def test_canonical_json_sorts_keys_drops_whitespace_and_keeps_utf8_unescaped() -> None:
    assert canonical_json(DOCUMENT) == DOCUMENT_BYTES


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_canonical_json_refuses_values_json_cannot_spell(value: float) -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        canonical_json({"model": {"x": [value]}})


def test_the_service_attestation_binding_is_unchanged() -> None:
    claims = ServiceClaims(
        "td-only",
        {
            "id": "modèle-µ",
            "sealed": {
                "format": "tdllm-sealed/1",
                "manifest_sha256": "ab" * 32,
                "model_id": "cd" * 16,
            },
        },
        "tdllm-reference-values/1.0",
    )
    data = report_data(
        "00" * 16 + "ff" * 16,
        okp_jwk("X25519", bytes(range(32))),
        okp_jwk("Ed25519", bytes(range(32, 64))),
        claims,
    )
    assert data.hex() == (
        "bba68765628ff3b9ccdd42721652338a2fdb670e643e72dae94b49e761ed50f0"
        "0ec4e9cce122eca7385e320c9f413782e7ea69d13f285c8e000bfb6947f2f421"
    )


def test_the_e2e_signed_bytes_are_unchanged() -> None:
    message = signed_bytes("stream", b"\x01" * 32, b"\x02" * 32)
    assert hashlib.sha256(message).hexdigest() == (
        "f061dd774d48bd27cdbd37602b8501e13e69669dfd9b77fa4c206348c3f958cc"
    )


def test_the_key_broker_binding_is_unchanged() -> None:
    runtime = runtime_data(
        session_id="s",
        nonce="n",
        key_id="k€",
        tee_pubkey={"kty": "OKP", "crv": "X25519", "x": b64url(b"\x07" * 32)},
    )
    assert report_data_for(runtime).hex() == (
        "e2fa2dae65bf585e09aa8350085c769244414b3a90dd5eb08215f25e722edcd2"
        "b70774d227ebf0b0b608d5187c07e3d00d008db3fb821ea98315720065126e7e"
    )


@pytest.mark.parametrize("size", [0, 1, 2, 3, 31, 32, 33])
def test_b64url_round_trips_without_padding(size: int) -> None:
    data = bytes(range(size))
    text = b64url(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert from_b64url(text) == data


@pytest.mark.parametrize("text", ["AAE=", "A", 42], ids=["padded", "impossible length", "int"])
def test_from_b64url_refuses_anything_but_unpadded_text(text: object) -> None:
    with pytest.raises(ValueError):
        from_b64url(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "AAE=",  # padding
        "AA==",
        "-_+A",  # '+' (standard base64), whose url-safe spelling is '-'
        "-_/A",  # '/', whose url-safe spelling is '_'
        "AA E",  # whitespace, which lenient decoders skip
        "AAE\n",
        "AA.E",
        "AAé",  # outside ASCII
    ],
    ids=["padded", "padded-2", "plus", "slash", "space", "newline", "dot", "non-ascii"],
)
def test_from_b64url_refuses_any_character_outside_the_url_safe_alphabet(text: str) -> None:
    with pytest.raises(ValueError, match="not unpadded base64url text"):
        from_b64url(text)


@pytest.mark.parametrize(
    ("canonical", "other_spelling"),
    [
        ("AA", "AB"),  # one byte: the last character's low 4 bits are unused
        ("AAE", "AAF"),  # two bytes: the low 2 bits are unused
        (b64url(b"\xff"), "_x"),
        (b64url(b"\xff\xff"), "__-"),
    ],
)
def test_from_b64url_refuses_a_last_character_with_nonzero_unused_bits(
    canonical: str, other_spelling: str
) -> None:
    """A lenient decoder reads both spellings as the same bytes; only `b64url`'s one is taken."""
    data = from_b64url(canonical)
    lenient = base64.urlsafe_b64decode(other_spelling + "=" * (-len(other_spelling) % 4))
    assert lenient == data
    with pytest.raises(ValueError, match="not canonical"):
        from_b64url(other_spelling)


def test_every_url_safe_character_decodes_where_it_is_canonical() -> None:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    assert b64url(from_b64url(alphabet)) == alphabet


def test_there_is_one_base64url_decoder_in_both_distributions() -> None:
    """No hand-rolled base64url outside wire.py: every decoder is as strict as `from_b64url`."""
    sources = [*REPO.glob("attestation/src/**/*.py"), *REPO.glob("service/src/**/*.py")]
    pattern = re.compile(r"urlsafe_b64(?:en|de)code|altchars")
    wire = "attestation/src/tdllm_attest/wire.py"
    hand_rolled = {
        path.relative_to(REPO).as_posix()
        for path in sources
        if pattern.search(path.read_text(encoding="utf-8"))
    }
    assert hand_rolled == {wire}


def test_there_is_one_definition_of_each_in_both_distributions() -> None:
    sources = [
        *REPO.glob("attestation/src/**/*.py"),
        *REPO.glob("service/src/**/*.py"),
        *REPO.glob("image/*.py"),  # not image/out: a built image holds a whole rootfs
    ]
    pattern = re.compile(r"^def (canonical_json|b64url|from_b64url)\(", re.MULTILINE)
    defined = {
        (match[1], path.relative_to(REPO).as_posix())
        for path in sources
        for match in pattern.finditer(path.read_text(encoding="utf-8"))
    }
    wire = "attestation/src/tdllm_attest/wire.py"
    assert defined == {("canonical_json", wire), ("b64url", wire), ("from_b64url", wire)}
