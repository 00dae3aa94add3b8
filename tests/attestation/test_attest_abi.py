"""Parser: real vectors parse to the manifest's values; malformed framing raises QuoteParseError."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdllm_attest.abi import (
    MAX_QUOTE_BUFFER_SIZE,
    MR_TD_SIZE,
    TD_REPORT_15_SIZE,
    TdReport15,
    parse_quote,
)
from tdllm_attest.errors import QuoteParseError
from tests.attestation.attest_mutations import Vector, offsets, put, replace_pem, u16, u32


def test_real_quotes_parse_to_the_manifest_values(tdx_vectors: Path) -> None:
    manifest = json.loads((tdx_vectors / "manifest.json").read_text())
    for entry in manifest["vectors"]:
        raw = (tdx_vectors / entry["quote"]).read_bytes()
        if entry["trailing_bytes"] and raw[-entry["trailing_bytes"] :].strip(b"\x00"):
            raw = raw[: -entry["trailing_bytes"]]  # SPR_E4's ASCII tail is tested separately
        q = parse_quote(raw)
        r = q.td_report
        assert q.header.version == entry["version"]
        assert q.body_type == entry["body_type"]
        assert q.signed_end == entry["signed_region"][1]
        assert len(r.mr_td) == MR_TD_SIZE
        assert r.mr_td.hex() == entry["mr_td"]
        assert [x.hex() for x in r.rtmr] == [entry[f"rtmr{i}"] for i in range(4)]
        assert r.report_data.hex() == entry["report_data"]
        assert r.td_attributes.hex() == entry["td_attributes"]
        assert r.xfam.hex() == entry["xfam"]
        assert r.tee_tcb_svn.hex() == entry["tee_tcb_svn"]
        assert r.mr_seam.hex() == entry["mr_seam"]
        assert r.mr_config_id.hex() == entry["mr_config_id"]
        assert q.signature_data.qe_report.isv_svn == entry["qe_isvsvn"]
        if entry["body_type"] == 3:
            assert isinstance(r, TdReport15)
            assert r.tee_tcb_svn2.hex() == entry["tee_tcb_svn2"]


def test_zero_padding_after_the_signature_data_is_accepted_and_counted(v4: Vector) -> None:
    q = parse_quote(v4.quote + bytes(100))
    assert q.trailing_padding == 170
    assert q.raw == v4.quote[:-70]


def test_rejects_non_zero_trailing_bytes_of_the_spr_e4_vector(spr_e4: Vector) -> None:
    with pytest.raises(QuoteParseError, match="trailing"):
        parse_quote(spr_e4.quote)


def _v4_cases() -> list[tuple[str, Callable[[bytes], bytes]]]:
    """§8.6 groups 2, 3, 4 and 6 (framing parts), as (name, mutation of the real v4 quote)."""

    def at(field: str, value: bytes) -> Callable[[bytes], bytes]:
        return lambda raw: put(raw, offsets(raw)[field], value)

    def pem_edit(edit: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
        def f(raw: bytes) -> bytes:
            pem = parse_quote(raw).signature_data.pck_chain.pem
            return replace_pem(raw, edit(pem))

        return f

    def certs(pem: bytes) -> list[bytes]:
        body = pem.rstrip(b"\x00").decode()
        end = "-----END CERTIFICATE-----\n"
        return [(c + end).encode() for c in body.split(end) if c]

    return [
        # group 2: truncation, lengths, size limit
        ("truncated inside the header", lambda raw: raw[:40]),
        ("truncated inside the body", lambda raw: raw[:300]),
        ("truncated before the signature data length", lambda raw: raw[:632]),
        ("truncated inside the QE report", lambda raw: raw[:900]),
        ("truncated by one byte", lambda raw: parse_quote(raw).raw[:-1]),
        ("signature data length too large", at("sig_len", u32(0xFFFF))),
        ("signature data length too small", lambda raw: put(raw, 632, u32(4000))),
        (
            "signature data length one larger (swallows padding)",
            lambda raw: put(raw, 632, u32(4301)),
        ),
        ("non-zero trailing byte", lambda raw: raw + b"\x01"),
        ("quote buffer over the size limit", lambda raw: raw + bytes(MAX_QUOTE_BUFFER_SIZE)),
        ("empty input", lambda raw: b""),
        # group 3: header and body types
        ("version 3 (SGX)", lambda raw: put(raw, 0, u16(3))),
        ("version 6", lambda raw: put(raw, 0, u16(6))),
        ("attestation key type 3 (P-384)", lambda raw: put(raw, 2, u16(3))),
        ("TEE type 0 (SGX)", lambda raw: put(raw, 4, u32(0))),
        ("wrong QE vendor ID", lambda raw: put(raw, 12, bytes(16))),
        # group 4: certification data
        ("outer certification type 7", at("outer_type", u16(7))),
        ("outer certification type 5", at("outer_type", u16(5))),
        (
            "outer certification size off by one",
            lambda raw: put(
                raw,
                offsets(raw)["outer_size"],
                u32(struct.unpack_from("<I", raw, offsets(raw)["outer_size"])[0] + 1),
            ),
        ),
        ("QE auth data resized to 31", at("auth_size", u16(31))),
        ("QE auth data resized to 33", at("auth_size", u16(33))),
        *[(f"inner certification type {t}", at("inner_type", u16(t))) for t in (1, 2, 3, 4, 7)],
        (
            "inner certification size off by one",
            lambda raw: put(
                raw,
                offsets(raw)["inner_size"],
                u32(struct.unpack_from("<I", raw, offsets(raw)["inner_size"])[0] - 1),
            ),
        ),
        # group 6: PEM chain framing
        ("missing intermediate", pem_edit(lambda p: b"".join(certs(p)[::2]))),
        ("extra certificate", pem_edit(lambda p: b"".join([*certs(p), certs(p)[1]]))),
        ("only the leaf", pem_edit(lambda p: certs(p)[0])),
        ("non-canonical PEM line break (CRLF)", pem_edit(lambda p: p.replace(b"\n", b"\r\n", 1))),
        (
            "non-canonical PEM, blank line between certificates",
            pem_edit(lambda p: certs(p)[0] + b"\n" + b"".join(certs(p)[1:])),
        ),
        ("two NUL terminators", pem_edit(lambda p: p + b"\x00")),
        ("garbage after the chain", pem_edit(lambda p: p.rstrip(b"\x00") + b"junk")),
        (
            "PEM that is not a certificate",
            pem_edit(lambda p: p.replace(b"CERTIFICATE", b"CERTIFICATX")),
        ),
    ]


@pytest.mark.parametrize(("name", "mutate"), _v4_cases(), ids=[n for n, _ in _v4_cases()])
def test_rejects_malformed_v4_framing(
    v4: Vector, name: str, mutate: Callable[[bytes], bytes]
) -> None:
    with pytest.raises(QuoteParseError):
        parse_quote(mutate(v4.quote))


@pytest.mark.parametrize(
    ("name", "body_type", "body_size"),
    [
        ("v5 body type 1 (SGX enclave report)", 1, 384),
        ("v5 body type 4 (TD report 1.5ex)", 4, TD_REPORT_15_SIZE),
        ("v5 unknown body type", 99, TD_REPORT_15_SIZE),
        ("v5 body size mismatch", 3, TD_REPORT_15_SIZE - 1),
        ("v5 body type 2 with the 1.5 size", 2, TD_REPORT_15_SIZE),
    ],
)
def test_rejects_bad_v5_body_descriptor(
    v5: Vector, name: str, body_type: int, body_size: int
) -> None:
    with pytest.raises(QuoteParseError):
        parse_quote(put(v5.quote, 48, u16(body_type) + u32(body_size)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=6000))
def test_parsing_arbitrary_bytes_raises_only_quote_parse_error(data: bytes) -> None:
    try:
        parse_quote(data)
    except QuoteParseError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=4935), st.binary(min_size=1, max_size=16))
def test_parsing_a_corrupted_real_quote_raises_only_quote_parse_error(
    tdx_vectors: Path, offset: int, patch: bytes
) -> None:
    raw = (tdx_vectors / "dcapqvl_tdx_quote_v4.bin").read_bytes()
    try:
        parse_quote(put(raw, offset, patch)[: len(raw)])
    except QuoteParseError:
        pass
