"""verify_quote on the real vectors (Intel root, pinned times) and §8.6 negative groups 5-11, 13."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tdllm_attest.abi import parse_quote
from tdllm_attest.collateral import (
    Collateral,
    FetcherCollateralSource,
    FileCollateralSource,
    FreshnessLimits,
    collateral_from_json,
)
from tdllm_attest.errors import (
    AttestationError,
    ChainError,
    CollateralError,
    QuoteParseError,
    SignatureError,
    TcbStatusError,
)
from tdllm_attest.trust import TrustAnchor
from tdllm_attest.verify import VerificationProgress, verify_quote
from tests.attestation.attest_mutations import (
    REAL_NOW,
    Vector,
    offsets,
    put,
    replace_pem,
    resign_with_fresh_ak,
)


def test_real_v4_quote_verifies_up_to_date_at_its_pinned_time(
    v4: Vector, intel_anchor: TrustAnchor
) -> None:
    v = verify_quote(v4.quote, v4.collateral, now=v4.at, anchor=intel_anchor)
    assert (v.tcb_status, v.advisory_ids) == ("UpToDate", ())
    assert v.fmspc == "B0C06F000000"
    assert v.tcb_evaluation_data_number == 17
    assert v.tcb_date == "2024-03-13T00:00:00Z"
    assert all(c.passed for c in v.checks)


def test_real_v5_quote_verifies_up_to_date_at_its_pinned_time(
    v5: Vector, intel_anchor: TrustAnchor
) -> None:
    v = verify_quote(v5.quote, v5.collateral, now=v5.at, anchor=intel_anchor)
    assert (v.tcb_status, v.advisory_ids) == ("UpToDate", ())
    assert v.quote.body_type == 3
    assert v.tcb_date == "2024-11-13T00:00:00Z"


def test_collateral_can_come_from_a_file_source_or_an_injected_fetcher(
    v4: Vector, intel_anchor: TrustAnchor
) -> None:
    calls: list[bytes] = []

    def fetch(raw: bytes) -> str:
        calls.append(raw)
        return v4.collateral_path.read_text()

    for source in (FileCollateralSource(v4.collateral_path), FetcherCollateralSource(fetch)):
        assert (
            verify_quote(v4.quote, source, now=v4.at, anchor=intel_anchor).tcb_status == "UpToDate"
        )
    assert calls == [parse_quote(v4.quote).raw]


def test_unreachable_collateral_source_fails_closed(v4: Vector, intel_anchor: TrustAnchor) -> None:
    def fetch(raw: bytes) -> str:
        raise ConnectionError("PCCS unreachable")

    with pytest.raises(CollateralError, match="fetch failed"):
        verify_quote(v4.quote, FetcherCollateralSource(fetch), now=v4.at, anchor=intel_anchor)


@pytest.mark.parametrize("name", ["v5_no_tcb_match"])
def test_rejects_real_quote_with_no_matching_tcb_level(
    name: str, request: pytest.FixtureRequest, intel_anchor: TrustAnchor
) -> None:
    vec: Vector = request.getfixturevalue(name)
    with pytest.raises(TcbStatusError, match="No matching TCB level"):
        verify_quote(vec.quote, vec.collateral, now=vec.at, anchor=intel_anchor)


def test_rejects_spr_e4_quote_for_its_trailing_text_and_then_for_its_tcb(
    spr_e4: Vector, intel_anchor: TrustAnchor
) -> None:
    with pytest.raises(QuoteParseError, match="trailing"):
        verify_quote(spr_e4.quote, spr_e4.collateral, now=spr_e4.at, anchor=intel_anchor)
    stripped = spr_e4.quote[:-39]
    with pytest.raises(CollateralError, match="freshness limit"):  # parts issued 10 days apart
        verify_quote(stripped, spr_e4.collateral, now=spr_e4.at, anchor=intel_anchor)
    no_age_limit = FreshnessLimits(max_age=None)
    with pytest.raises(TcbStatusError, match="No matching TCB level"):
        verify_quote(
            stripped, spr_e4.collateral, now=spr_e4.at, anchor=intel_anchor, limits=no_age_limit
        )


@pytest.mark.parametrize("name", ["v4", "v5", "v5_no_tcb_match", "spr_e4"])
def test_rejects_every_real_vector_at_the_real_current_date(
    name: str, request: pytest.FixtureRequest, intel_anchor: TrustAnchor
) -> None:
    vec: Vector = request.getfixturevalue(name)
    raw = vec.quote[:-39] if name == "spr_e4" else vec.quote
    with pytest.raises(CollateralError):
        verify_quote(raw, vec.collateral, now=REAL_NOW, anchor=intel_anchor)


def test_verification_time_must_be_timezone_aware(v4: Vector, intel_anchor: TrustAnchor) -> None:
    with pytest.raises(ValueError, match="timezone"):
        verify_quote(v4.quote, v4.collateral, now=datetime(2025, 7, 1), anchor=intel_anchor)


def test_progress_records_the_failed_check(v4: Vector, intel_anchor: TrustAnchor) -> None:
    progress = VerificationProgress()
    with pytest.raises(CollateralError):
        verify_quote(v4.quote, v4.collateral, now=REAL_NOW, anchor=intel_anchor, progress=progress)
    assert [c.passed for c in progress.checks][-1] is False
    assert progress.checks[-1].name == "collateral signatures and freshness"


# --- §8.6 group 5: signatures and the QE binding -------------------------------------------


def _other_root() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "TEST ONLY - NOT A VENDOR ROOT")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2018, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2049, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _pem_certs(raw: bytes) -> list[bytes]:
    chain = parse_quote(raw).signature_data.pck_chain
    return [
        x509.load_der_x509_certificate(d).public_bytes(Encoding.PEM) for d in chain.certificates_der
    ]


def _quote_cases() -> list[tuple[str, Callable[[Vector, Vector], bytes], type[AttestationError]]]:
    def flip(field: str, delta: int = 0) -> Callable[[Vector, Vector], bytes]:
        def f(vec: Vector, other: Vector) -> bytes:
            o = offsets(vec.quote)[field] + delta
            return put(vec.quote, o, bytes([vec.quote[o] ^ 0x01]))

        return f

    def with_pem(
        build: Callable[[list[bytes], list[bytes]], bytes],
    ) -> Callable[[Vector, Vector], bytes]:
        return lambda vec, other: replace_pem(
            vec.quote, build(_pem_certs(vec.quote), _pem_certs(other.quote)) + b"\x00"
        )

    def other_root_pem(mine: list[bytes], theirs: list[bytes]) -> bytes:
        return mine[0] + mine[1] + _other_root()[1].public_bytes(Encoding.PEM)

    return [
        (
            "body re-signed by a fresh AK the QE report does not bind",
            lambda vec, other: resign_with_fresh_ak(vec.quote, rebind=False),
            SignatureError,
        ),
        (
            "fresh AK with the QE report-data patched (breaks the PCK signature)",
            lambda vec, other: resign_with_fresh_ak(vec.quote, rebind=True),
            SignatureError,
        ),
        ("QE report ISVSVN modified", flip("qe_report", 258), SignatureError),
        ("QE report-data modified", flip("qe_report", 330), SignatureError),
        ("QE report signature modified", flip("qe_report_signature", 5), SignatureError),
        ("QE auth data changed", flip("auth_data", 0), SignatureError),
        ("quote signature modified", flip("quote_signature", 63), SignatureError),
        ("attestation key modified", flip("attestation_key", 10), SignatureError),
        (
            "MRTD modified after signing",
            lambda vec, other: put(vec.quote, 0xB8, b"\xff"),
            SignatureError,
        ),
        # group 6: chain content
        (
            "wrong certificate order (CA first)",
            with_pem(lambda m, t: m[1] + m[0] + m[2]),
            ChainError,
        ),
        (
            "PCK leaf from another platform",
            with_pem(lambda m, t: t[0] + m[1] + m[2]),
            AttestationError,
        ),
        ("embedded root replaced by another valid root", with_pem(other_root_pem), ChainError),
        (
            "embedded root replaced by the intermediate",
            with_pem(lambda m, t: m[0] + m[1] + m[1]),
            ChainError,
        ),
    ]


@pytest.mark.parametrize(
    ("name", "mutate", "error"), _quote_cases(), ids=[c[0] for c in _quote_cases()]
)
def test_rejects_tampered_real_quote(
    v4: Vector,
    v5: Vector,
    intel_anchor: TrustAnchor,
    name: str,
    mutate: Callable[[Vector, Vector], bytes],
    error: type[AttestationError],
) -> None:
    for vec, other in ((v4, v5), (v5, v4)):
        with pytest.raises(error):
            verify_quote(mutate(vec, other), vec.collateral, now=vec.at, anchor=intel_anchor)


# --- §8.6 group 7: trust anchor ------------------------------------------------------------


def test_rejects_real_intel_quote_verified_against_another_root(v4: Vector) -> None:
    anchor = TrustAnchor.from_der(_other_root()[1].public_bytes(Encoding.DER))
    with pytest.raises(ChainError, match="trust anchor"):
        verify_quote(v4.quote, v4.collateral, now=v4.at, anchor=anchor)


def test_refuses_a_look_alike_intel_root_that_is_not_the_pin() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Intel SGX Root CA")])
    fake = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(datetime(2018, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2049, 1, 1, tzinfo=UTC))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(ChainError, match="claims to be Intel"):
        TrustAnchor.from_der(fake.public_bytes(Encoding.DER))


def test_intel_anchor_is_pinned_by_sha256(intel_anchor: TrustAnchor, tdx_vectors: Any) -> None:
    assert intel_anchor.is_intel
    assert intel_anchor.der == (tdx_vectors / "intel_sgx_root_ca.der").read_bytes()


# --- §8.6 groups 8-11: certificates, CRLs, collateral, time ------------------------------


def _edit_collateral(vec: Vector, edit: Callable[[dict[str, Any]], None]) -> Collateral:
    doc = json.loads(vec.collateral_path.read_text())
    edit(doc)
    return collateral_from_json(json.dumps(doc))


def _flip_hex(field: str, index: int) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        raw = bytearray(bytes.fromhex(doc[field]))
        raw[index] ^= 0x01
        doc[field] = raw.hex()

    return edit


def _text(field: str, old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        assert old in doc[field]
        doc[field] = doc[field].replace(old, new, 1)

    return edit


def _collateral_cases() -> list[tuple[str, Callable[[dict[str, Any]], None]]]:
    return [
        ("TCB Info signature invalid", _flip_hex("tcb_info_signature", 10)),
        ("QE Identity signature invalid", _flip_hex("qe_identity_signature", 40)),
        ("TCB Info text altered by one byte", _text("tcb_info", '"version":3', '"version":4')),
        ("TCB Info whitespace added", _text("tcb_info", '"id":"TDX"', '"id": "TDX"')),
        ("TCB Info id SGX instead of TDX", _text("tcb_info", '"id":"TDX"', '"id":"SGX"')),
        ("QE Identity id QE instead of TD_QE", _text("qe_identity", '"id":"TD_QE"', '"id":"QE"')),
        ("PCK CRL with a bad signature", _flip_hex("pck_crl", -5)),
        ("root CA CRL with a bad signature", _flip_hex("root_ca_crl", -5)),
        ("PCK CRL missing", lambda doc: doc.update(pck_crl="")),
        ("root CA CRL missing", lambda doc: doc.update(root_ca_crl="")),
        (
            "PCK CRL from the wrong issuer (root CRL in its place)",
            lambda doc: doc.update(pck_crl=doc["root_ca_crl"]),
        ),
        (
            "TCB Info issuer chain without its root",
            lambda doc: doc.update(
                tcb_info_issuer_chain=doc["tcb_info_issuer_chain"].split(
                    "-----END CERTIFICATE-----"
                )[0]
                + "-----END CERTIFICATE-----\n"
            ),
        ),
        (
            "QE Identity issuer chain swapped for the PCK CRL chain",
            lambda doc: doc.update(qe_identity_issuer_chain=doc["pck_crl_issuer_chain"]),
        ),
        ("a collateral field missing", lambda doc: doc.pop("qe_identity")),
    ]


@pytest.mark.parametrize(
    ("name", "edit"), _collateral_cases(), ids=[c[0] for c in _collateral_cases()]
)
def test_rejects_tampered_collateral(
    v4: Vector, intel_anchor: TrustAnchor, name: str, edit: Callable[[dict[str, Any]], None]
) -> None:
    with pytest.raises(CollateralError):
        verify_quote(v4.quote, _edit_collateral(v4, edit), now=v4.at, anchor=intel_anchor)


def test_rejects_collateral_for_another_platform_fmspc(
    v4: Vector, v5: Vector, intel_anchor: TrustAnchor
) -> None:
    with pytest.raises(CollateralError, match="FMSPC"):
        verify_quote(v4.quote, v5.collateral, now=v5.at, anchor=intel_anchor)


@pytest.mark.parametrize(
    ("name", "now"),
    [
        ("before TCB Info issueDate (not yet valid)", datetime(2025, 6, 18, tzinfo=UTC)),
        ("after TCB Info nextUpdate (expired)", datetime(2025, 7, 20, tzinfo=UTC)),
        ("long before the PCK leaf was issued", datetime(2017, 1, 1, tzinfo=UTC)),
    ],
)
def test_rejects_collateral_outside_its_validity_window(
    v4: Vector, intel_anchor: TrustAnchor, name: str, now: datetime
) -> None:
    with pytest.raises(CollateralError):
        verify_quote(v4.quote, v4.collateral, now=now, anchor=intel_anchor)


def test_rejects_collateral_older_than_the_freshness_limit(
    v4: Vector, intel_anchor: TrustAnchor
) -> None:
    eleven_days_later = v4.at + timedelta(days=11)  # still before every nextUpdate
    with pytest.raises(CollateralError, match=r"freshness limit 24\.0 h"):  # the default
        verify_quote(v4.quote, v4.collateral, now=eleven_days_later, anchor=intel_anchor)
    limits = FreshnessLimits(max_age=timedelta(days=7))
    with pytest.raises(CollateralError, match="freshness limit"):
        verify_quote(
            v4.quote, v4.collateral, now=eleven_days_later, anchor=intel_anchor, limits=limits
        )
    fresh = FreshnessLimits(max_age=timedelta(days=30))
    verify_quote(v4.quote, v4.collateral, now=eleven_days_later, anchor=intel_anchor, limits=fresh)


def test_rejects_collateral_below_the_minimum_tcb_evaluation_data_number(
    v4: Vector, intel_anchor: TrustAnchor
) -> None:
    limits = FreshnessLimits(min_tcb_evaluation_data_number=18)
    with pytest.raises(CollateralError, match="tcbEvaluationDataNumber"):
        verify_quote(v4.quote, v4.collateral, now=v4.at, anchor=intel_anchor, limits=limits)


def test_checks_say_how_fresh_the_collateral_was(v4: Vector, intel_anchor: TrustAnchor) -> None:
    verified = verify_quote(v4.quote, v4.collateral, now=v4.at, anchor=intel_anchor)
    (freshness,) = [c for c in verified.checks if c.name == "collateral signatures and freshness"]
    assert freshness.detail == (
        "oldest part issued 2.0 h before the verification time (limit 24.0 h); "
        "tcbEvaluationDataNumber 17"
    )
