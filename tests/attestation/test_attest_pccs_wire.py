"""Reading PCCS answers byte-exact (tdllm_attest.pccs_wire): the signed texts Intel's
signatures cover, CRLs in every encoding servers send, and bodies that must be refused."""

from __future__ import annotations

import base64

import pytest

from tdllm_attest.pccs_wire import crl_der, signed_object_text
from tests.attestation.attest_mutations import Vector


def test_signed_text_is_cut_from_the_body_exactly_as_served() -> None:
    body = ' { "x": {"tcbInfo": {"no": 1}}, "tcbInfo" :  {"b":1,  "a":[1, 2]} ,"signature":"ab"}\n'
    assert signed_object_text(body, "tcbInfo") == ('{"b":1,  "a":[1, 2]}', "ab")


@pytest.mark.parametrize(
    "body",
    [
        '{"tcbInfo": {"a": 1}, "tcbInfo": {"a": 2}, "signature": "ab"}',
        '{"tcbInfo": {"a": 1}, "signature": "ab"} trailing',
        '{"tcbInfo": {"a": 1}, "signature": "ab"',
        '{"tcbInfo": "text", "signature": "ab"}',
        '{"tcbInfo": {"a": 1}}',
        '[{"tcbInfo": {"a": 1}}]',
    ],
    ids=["duplicate", "trailing", "truncated", "not-object", "no-signature", "array"],
)
def test_ambiguous_or_broken_bodies_are_refused(body: str) -> None:
    with pytest.raises(ValueError):
        signed_object_text(body, "tcbInfo")


def test_crl_bodies_are_accepted_as_der_pem_or_hex(v4: Vector) -> None:
    der = v4.collateral.pck_crl
    pem = b"-----BEGIN X509 CRL-----\n" + _b64_lines(der) + b"-----END X509 CRL-----\n"
    assert crl_der(der) == crl_der(pem) == crl_der(der.hex().encode() + b"\n") == der
    with pytest.raises(ValueError):
        crl_der(b"not a crl")


def _b64_lines(der: bytes) -> bytes:
    text = base64.b64encode(der)
    return b"".join(text[i : i + 64] + b"\n" for i in range(0, len(text), 64))
