"""Policy: signed documents, TCB judgement (§8.6 group 12), TD checks and measurements
(groups 15-18), REPORTDATA binding (group 19, the parts without a broker)."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tdllm_attest.abi import TdReport10, TdReport15, parse_quote
from tdllm_attest.binding import check_report_data
from tdllm_attest.errors import (
    BindingError,
    EventLogError,
    PolicyDocumentError,
    PolicyMismatch,
)
from tdllm_attest.eventlog import Event, parse_ccel_log, parse_ccel_table, parse_runtime_log, replay
from tdllm_attest.policy import validate
from tdllm_attest.policy_format import (
    Policy,
    load_policy,
    load_public_key,
    policy_from_document,
    sign_policy,
)
from tdllm_attest.verify import VerifiedQuote
from tests.attestation.attest_mutations import Vector

ZERO48 = "00" * 48


def policy_document(verified: VerifiedQuote) -> dict[str, Any]:
    """A policy that the given quote satisfies exactly."""
    r = verified.quote.td_report
    return {
        "schema": "tdllm-attest-policy/1",
        "name": "test release",
        "tcb": {"accepted_statuses": ["UpToDate"], "allowed_advisories": []},
        "xfam": [r.xfam.hex()],
        "mr_seam": [r.mr_seam.hex()],
        "measurements": [
            {
                "name": "release-1",
                "mr_td": r.mr_td.hex(),
                "rtmr0": r.rtmr[0].hex(),
                "rtmr1": r.rtmr[1].hex(),
                "rtmr2": r.rtmr[2].hex(),
            }
        ],
        "mr_config_id": r.mr_config_id.hex(),
        "mr_owner": r.mr_owner.hex(),
        "mr_owner_config": r.mr_owner_config.hex(),
        "rtmr3": "zero",
    }


def with_report(verified: VerifiedQuote, **changes: Any) -> VerifiedQuote:
    """The same verified quote with TD report fields replaced (what a synthetic quote would
    carry; the broker session adds signed synthetic quotes)."""
    quote = dataclasses.replace(
        verified.quote, td_report=dataclasses.replace(verified.quote.td_report, **changes)
    )
    return dataclasses.replace(verified, quote=quote)


def flip(value: bytes, bit: int = 0) -> bytes:
    out = bytearray(value)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# --- signed policy documents ---------------------------------------------------------------


def test_signed_policy_round_trips(verified_v4: VerifiedQuote) -> None:
    key = Ed25519PrivateKey.generate()
    text = sign_policy(policy_document(verified_v4), key)
    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    policy = load_policy(text, load_public_key(pem))
    assert policy.name == "test release"
    assert policy.measurements[0].mr_td == verified_v4.quote.td_report.mr_td
    validate(verified_v4, policy)


@pytest.mark.parametrize(
    ("name", "tamper"),
    [
        ("measurement changed", lambda e: e["policy"]["measurements"][0].update(mr_td="11" * 48)),
        ("status added", lambda e: e["policy"]["tcb"]["accepted_statuses"].append("OutOfDate")),
        ("signature replaced", lambda e: e["signature"].update(value="AAAA")),
        ("signature algorithm changed", lambda e: e["signature"].update(alg="none")),
        ("signature removed", lambda e: e.pop("signature")),
    ],
)
def test_rejects_tampered_signed_policy(verified_v4: VerifiedQuote, name: str, tamper: Any) -> None:
    key = Ed25519PrivateKey.generate()
    envelope = json.loads(sign_policy(policy_document(verified_v4), key))
    tamper(envelope)
    with pytest.raises(PolicyDocumentError):
        load_policy(json.dumps(envelope), key.public_key())


def test_rejects_policy_signed_by_another_key(verified_v4: VerifiedQuote) -> None:
    text = sign_policy(policy_document(verified_v4), Ed25519PrivateKey.generate())
    with pytest.raises(PolicyDocumentError, match="signature"):
        load_policy(text, Ed25519PrivateKey.generate().public_key())


@pytest.mark.parametrize(
    ("name", "edit"),
    [
        ("unknown key", lambda d: d.update(mrtd="00")),
        ("wrong schema", lambda d: d.update(schema="v0")),
        ("short measurement", lambda d: d["measurements"][0].update(rtmr1="00")),
        ("no measurement tuples", lambda d: d.update(measurements=[])),
        ("unknown TCB status", lambda d: d["tcb"].update(accepted_statuses=["Fine"])),
        ("rtmr3 neither mode nor value", lambda d: d.update(rtmr3="sometimes")),
        ("missing mr_owner", lambda d: d.pop("mr_owner")),
    ],
)
def test_rejects_policy_documents_that_fail_the_schema(
    verified_v4: VerifiedQuote, name: str, edit: Any
) -> None:
    doc = policy_document(verified_v4)
    edit(doc)
    with pytest.raises(PolicyDocumentError):
        policy_from_document(doc)


def test_rejects_a_policy_key_that_is_not_ed25519() -> None:
    with pytest.raises(PolicyDocumentError):
        load_public_key(b"-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")


def test_policy_document_without_an_age_limit_gets_the_24_hour_default(
    verified_v4: VerifiedQuote,
) -> None:
    policy = policy_from_document(policy_document(verified_v4))
    assert policy.freshness_limits().max_age == timedelta(hours=24)
    doc = policy_document(verified_v4)
    doc["tcb"] |= {"max_collateral_age_hours": 6, "out_of_date_grace_days": 14}
    policy = policy_from_document(doc)
    assert policy.freshness_limits().max_age == timedelta(hours=6)
    assert policy.tcb.out_of_date_grace == timedelta(days=14)
    doc["tcb"]["max_collateral_age_days"] = 1
    with pytest.raises(PolicyDocumentError, match="not both"):
        policy_from_document(doc)


# --- §8.6 groups 15-17: TD attributes, module identity, measurements -------------------------


def _policy(verified: VerifiedQuote, **overrides: Any) -> Policy:
    doc = policy_document(verified)
    doc.update(overrides)
    return policy_from_document(doc)


def test_real_quotes_satisfy_a_policy_built_from_their_registers(
    verified_v4: VerifiedQuote, verified_v5: VerifiedQuote
) -> None:
    for v in (verified_v4, verified_v5):
        validate(v, _policy(v))


def _attr(verified: VerifiedQuote, set_bits: int = 0, clear_bits: int = 0) -> VerifiedQuote:
    value = verified.quote.td_report.td_attributes_value
    value = (value | set_bits) & ~clear_bits
    return with_report(verified, td_attributes=value.to_bytes(8, "little"))


@pytest.mark.parametrize(
    ("name", "mutate", "field"),
    [
        ("debug bit set", lambda v: _attr(v, set_bits=1), "td_attributes.debug"),
        (
            "SEPT_VE_DISABLE clear",
            lambda v: _attr(v, clear_bits=1 << 28),
            "td_attributes.sept_ve_disable",
        ),
        (
            "reserved attribute bit set",
            lambda v: _attr(v, set_bits=1 << 5),
            "td_attributes.reserved",
        ),
        (
            "XFAM not allowed",
            lambda v: with_report(v, xfam=flip(v.quote.td_report.xfam, 3)),
            "xfam",
        ),
        (
            "MRSIGNERSEAM non-zero",
            lambda v: with_report(v, mr_signer_seam=b"\x01" + bytes(47)),
            "mr_signer_seam",
        ),
        (
            "MRSEAM not in the allow-list",
            lambda v: with_report(v, mr_seam=flip(v.quote.td_report.mr_seam)),
            "mr_seam",
        ),
        (
            "MRTD off by one bit",
            lambda v: with_report(v, mr_td=flip(v.quote.td_report.mr_td)),
            "mr_td",
        ),
        *[
            (
                f"RTMR{i} off by one bit",
                lambda v, i=i: with_report(
                    v,
                    rtmr=tuple(
                        flip(x) if j == i else x for j, x in enumerate(v.quote.td_report.rtmr)
                    ),
                ),
                f"rtmr{i}",
            )
            for i in range(4)
        ],
        (
            "unexpected MRCONFIGID",
            lambda v: with_report(v, mr_config_id=b"\x07" * 48),
            "mr_config_id",
        ),
        ("unexpected MROWNER", lambda v: with_report(v, mr_owner=b"\x07" * 48), "mr_owner"),
        (
            "unexpected MROWNERCONFIG",
            lambda v: with_report(v, mr_owner_config=b"\x07" * 48),
            "mr_owner_config",
        ),
    ],
)
def test_rejects_td_report_that_differs_from_the_policy(
    verified_v4: VerifiedQuote, name: str, mutate: Any, field: str
) -> None:
    policy = _policy(verified_v4)
    with pytest.raises(PolicyMismatch) as info:
        validate(mutate(verified_v4), policy)
    assert field in [m.field for m in info.value.mismatches]


def test_rejects_v5_quote_with_non_zero_mrservicetd(verified_v5: VerifiedQuote) -> None:
    assert isinstance(verified_v5.quote.td_report, TdReport15)
    bad = with_report(verified_v5, mr_service_td=b"\x01" * 48)
    with pytest.raises(PolicyMismatch, match="mr_service_td"):
        validate(bad, _policy(verified_v5))
    validate(bad, _policy(verified_v5, allow_service_td=True))


def test_reports_every_mismatch_at_once_by_field_name(verified_v4: VerifiedQuote) -> None:
    r = verified_v4.quote.td_report
    bad = with_report(
        _attr(verified_v4, set_bits=1),
        mr_td=flip(r.mr_td),
        rtmr=(flip(r.rtmr[0]), r.rtmr[1], flip(r.rtmr[2]), flip(r.rtmr[3])),
        xfam=flip(r.xfam),
        mr_config_id=b"\x01" * 48,
        mr_owner=b"\x02" * 48,
    )
    with pytest.raises(PolicyMismatch) as info:
        validate(bad, _policy(verified_v4))
    fields = [m.field for m in info.value.mismatches]
    assert fields == [
        "td_attributes.debug",
        "xfam",
        "mr_td",
        "rtmr0",
        "rtmr2",
        "mr_config_id",
        "mr_owner",
        "rtmr3",
    ]
    mtd = info.value.mismatches[2]
    assert (mtd.found, mtd.expected.split()[0]) == (flip(r.mr_td).hex(), r.mr_td.hex())
    assert "td_attributes.debug: found 1, expected 0" in info.value.diagnostics()


def test_rejects_a_mixed_tuple_of_registers_each_valid_in_some_release(
    verified_v4: VerifiedQuote,
) -> None:
    doc = policy_document(verified_v4)
    real = doc["measurements"][0]
    # Every register of the quote is valid in some release, but no release has all four.
    first = {**real, "name": "release-1", "rtmr2": "44" * 48}
    second = {
        "name": "release-2",
        "mr_td": "22" * 48,
        "rtmr0": "33" * 48,
        "rtmr1": "55" * 48,
        "rtmr2": real["rtmr2"],
    }
    doc["measurements"] = [first, second]
    with pytest.raises(PolicyMismatch, match="matches no allowed tuple"):
        validate(verified_v4, policy_from_document(doc))


def test_rtmr3_may_be_pinned_to_an_exact_value(verified_v4: VerifiedQuote) -> None:
    validate(verified_v4, _policy(verified_v4, rtmr3=ZERO48))
    with pytest.raises(PolicyMismatch, match="rtmr3"):
        validate(verified_v4, _policy(verified_v4, rtmr3="01" * 48))


# --- §8.6 group 18: event logs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ccel_events(tdx_vectors: Path) -> list[Event]:
    parse_ccel_table((tdx_vectors / "gotdxguest_cos113_ccel_table.bin").read_bytes())
    return parse_ccel_log((tdx_vectors / "gotdxguest_cos113_ccel_data.bin").read_bytes())


@pytest.fixture(scope="module")
def cos113_verified(cos113_quote: bytes, verified_v4: VerifiedQuote) -> VerifiedQuote:
    """The COS-113 quote has no collateral: its parsed report stands in a verified result."""
    return dataclasses.replace(verified_v4, quote=parse_quote(cos113_quote))


def test_ccel_of_the_cos113_vector_replays_to_its_rtmr0_to_2(
    ccel_events: list[Event], cos113_quote: bytes
) -> None:
    report: TdReport10 = parse_quote(cos113_quote).td_report
    assert replay(ccel_events) == report.rtmr
    assert [sum(e.rtmr_index == i for e in ccel_events) for i in range(4)] == [16, 7, 20, 0]


def test_policy_with_ccel_accepts_the_honest_log(
    cos113_verified: VerifiedQuote, ccel_events: list[Event]
) -> None:
    validate(cos113_verified, _policy(cos113_verified), ccel_events=ccel_events)


@pytest.mark.parametrize(
    ("name", "edit"),
    [
        (
            "one event digest changed",
            lambda ev: [dataclasses.replace(ev[3], digest=flip(ev[3].digest)), *ev[:3], *ev[4:]],
        ),
        ("an event dropped", lambda ev: ev[:5] + ev[6:]),
        ("an event added", lambda ev: [*ev, Event(1, 0xD, b"\x01" * 48, b"")]),
        ("two events reordered", lambda ev: [ev[1], ev[0], *ev[2:]]),
    ],
)
def test_rejects_ccel_that_does_not_replay_to_the_quote(
    cos113_verified: VerifiedQuote, ccel_events: list[Event], name: str, edit: Any
) -> None:
    with pytest.raises(PolicyMismatch, match="CCEL replay"):
        validate(cos113_verified, _policy(cos113_verified), ccel_events=edit(ccel_events))


@pytest.mark.parametrize(
    ("name", "data"),
    [("empty", b""), ("truncated", None), ("not a Spec ID event", b"\x00" * 64)],
)
def test_rejects_malformed_ccel(tdx_vectors: Path, name: str, data: bytes | None) -> None:
    if data is None:
        data = (tdx_vectors / "gotdxguest_cos113_ccel_data.bin").read_bytes()[:5000]
    with pytest.raises(EventLogError):
        parse_ccel_log(data)


def test_rejects_ccel_table_with_a_bad_checksum(tdx_vectors: Path) -> None:
    table = bytearray((tdx_vectors / "gotdxguest_cos113_ccel_table.bin").read_bytes())
    table[40] ^= 1
    with pytest.raises(EventLogError, match="checksum"):
        parse_ccel_table(bytes(table))


def _runtime_log(digests: list[bytes]) -> list[Event]:
    items = [{"digest": d.hex(), "description": f"event {i}"} for i, d in enumerate(digests)]
    return parse_runtime_log(json.dumps({"events": items}))


def test_rtmr3_is_checked_by_replaying_the_runtime_event_log(verified_v4: VerifiedQuote) -> None:
    digests = [b"\x0a" * 48, b"\x0b" * 48]
    rtmr3 = replay(_runtime_log(digests))[3]
    r = verified_v4.quote.td_report
    v = with_report(verified_v4, rtmr=(*r.rtmr[:3], rtmr3))
    policy = _policy(v, rtmr3="event_log", rtmr3_allowed_events=[d.hex() for d in digests])
    validate(v, policy, runtime_events=_runtime_log(digests))
    with pytest.raises(PolicyMismatch, match="rtmr3"):
        validate(v, policy, runtime_events=_runtime_log(digests[:1]))
    with pytest.raises(PolicyMismatch, match="none given"):
        validate(v, policy)


def test_rejects_runtime_events_that_replay_but_are_not_allow_listed(
    verified_v4: VerifiedQuote,
) -> None:
    digests = [b"\x0a" * 48, b"\x0c" * 48]
    r = verified_v4.quote.td_report
    v = with_report(verified_v4, rtmr=(*r.rtmr[:3], replay(_runtime_log(digests))[3]))
    policy = _policy(v, rtmr3="event_log", rtmr3_allowed_events=[(b"\x0a" * 48).hex()])
    with pytest.raises(PolicyMismatch, match=r"rtmr3\.events"):
        validate(v, policy, runtime_events=_runtime_log(digests))


# --- §8.6 group 19 (verifier side): REPORTDATA binding ---------------------------------------


def test_report_data_binding_accepts_the_exact_value_and_rejects_another(
    verified_v4: VerifiedQuote,
) -> None:
    report_data = verified_v4.quote.td_report.report_data
    check_report_data(verified_v4, report_data)
    with pytest.raises(BindingError):
        check_report_data(verified_v4, flip(report_data, 511))
    with pytest.raises(BindingError):
        check_report_data(verified_v4, report_data[:32])  # zero-padded, so the tail differs


def test_short_report_data_is_zero_padded(v5_no_tcb_match: Vector) -> None:
    q = parse_quote(v5_no_tcb_match.quote)
    v = dataclasses.replace(_dummy_verified(), quote=q)
    check_report_data(v, q.td_report.report_data[:32])


def _dummy_verified() -> VerifiedQuote:
    from datetime import UTC

    return VerifiedQuote(
        quote=None,  # type: ignore[arg-type]  # replaced by the caller
        tcb_status="UpToDate",
        advisory_ids=(),
        platform_tcb_status="UpToDate",
        qe_tcb_status="UpToDate",
        tcb_evaluation_data_number=0,
        tcb_date=None,
        fmspc="",
        anchor_sha256="",
        verified_at=datetime(2026, 1, 1, tzinfo=UTC),
        checks=(),
    )
