"""Receipts checked offline (`verify_receipt`), attacks first: every forgery, splice or swap a
holder of receipts could try is refused with a message that says which, and its exit class.

No service and no torch: `SimulatedService` stands in for the TD (its receipt attestation is the
ordinary /v1/attestation answer for the receipts nonce) and signs receipts with its key, as
`tdllm.api.receipts` does.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tdllm_attest import errors
from tdllm_attest.client import anchor_for
from tdllm_attest.client.receipt import ReceiptRefused, load_kept, verify_receipt
from tdllm_attest.client.receipt_protocol import (
    RECEIPT_FIELD,
    RECEIPTS_NONCE,
    body_sha256,
    format_time,
    receipt_of,
    sign_receipt,
    stream_sha256,
)
from tdllm_attest.testing.platform import SimulatedTdxPlatform, SyntheticTdFields
from tdllm_attest.trust import TrustAnchor
from tests.client.reference_policy import policy_for
from tests.client.simulated_service import (
    BODY,
    NOW,
    REQUEST,
    SimulatedService,
    receipt_fields,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(NOW)


@pytest.fixture(scope="module")
def anchor(platform: SimulatedTdxPlatform) -> TrustAnchor:
    return anchor_for(platform.root_der, {"TDLLM_ALLOW_SIMULATED_TDX": "1"})


@pytest.fixture(scope="module")
def service(platform: SimulatedTdxPlatform) -> SimulatedService:
    return SimulatedService(platform)


@pytest.fixture(scope="module")
def document(service: SimulatedService, platform: SimulatedTdxPlatform) -> dict[str, Any]:
    """The receipt attestation of `service`: /v1/attestation's answer for the receipts nonce."""
    return service.answer(RECEIPTS_NONCE, collateral=platform.collateral_json())


def _answer(service: SimulatedService, document: dict[str, Any], **changes: Any) -> Any:
    """BODY as the service answers it: with its receipt, signed by `service`'s key."""
    receipt = receipt_fields(document, body_sha256(BODY), **changes)
    return BODY | {RECEIPT_FIELD: sign_receipt(receipt, service.signing_key)}


def _verify(
    receipt_doc: Any, document: Any, platform: SimulatedTdxPlatform, anchor: TrustAnchor, **kw: Any
) -> Any:
    options: dict[str, Any] = {"policy": policy_for(platform), "now": NOW} | kw
    return verify_receipt(receipt_doc, document, anchor=anchor, **options)


def _refused(exit_code: int, match: str, call: Any) -> None:
    with pytest.raises(ReceiptRefused, match=match) as caught:
        call()
    assert caught.value.exit_code == exit_code


# -- positive ---------------------------------------------------------------------------------


def test_a_genuine_receipt_verifies_with_the_request_and_the_answer_kept(
    service: SimulatedService,
    document: dict[str, Any],
    platform: SimulatedTdxPlatform,
    anchor: TrustAnchor,
) -> None:
    answer = _answer(service, document)
    verified = _verify(
        receipt_of(answer), document, platform, anchor, request_bytes=REQUEST, response=answer
    )
    assert verified.request_checked and verified.response_checked
    assert verified.attested.policy_name == "simulated-test-td"
    assert verified.time == NOW


def test_a_stream_receipt_covers_every_payload_in_order(
    service: SimulatedService,
    document: dict[str, Any],
    platform: SimulatedTdxPlatform,
    anchor: TrustAnchor,
) -> None:
    chunks: list[dict[str, Any]] = [{"n": 0, "text": "Hel"}, {"n": 1, "text": "lo"}]
    receipt = receipt_fields(document, stream_sha256(chunks), stream=True)
    chunks[-1] = chunks[-1] | {RECEIPT_FIELD: sign_receipt(receipt, service.signing_key)}
    _verify(receipt_of(chunks), document, platform, anchor, response=chunks)
    swapped = [chunks[1] | {"text": "Hel"}, chunks[0] | {"text": "lo"}]
    _refused(
        errors.EXIT_BINDING,
        "not the answer given",
        lambda: _verify(receipt_of(chunks), document, platform, anchor, response=swapped),
    )


def test_a_stream_kept_as_its_data_lines_parses_to_its_payloads() -> None:
    raw = b'data: {"a":1}\n\ndata: {"b":"\xc3\xa9"}\n\ndata: [DONE]\n\n'
    assert load_kept(raw) == [{"a": 1}, {"b": "\u00e9"}]
    with pytest.raises(ValueError, match="duplicate"):
        load_kept(b'{"content": "a", "content": "b"}')
    with pytest.raises(ValueError):
        load_kept(b'{"temperature": NaN}')


# -- attacks ----------------------------------------------------------------------------------


def test_an_answer_altered_after_signing_is_refused(
    service: SimulatedService,
    document: dict[str, Any],
    platform: SimulatedTdxPlatform,
    anchor: TrustAnchor,
) -> None:
    answer = _answer(service, document)
    kept = json.loads(json.dumps(answer))
    kept["choices"][0]["message"]["content"] = "Goodbye"
    _refused(
        errors.EXIT_BINDING,
        "the answer was altered, or is another one",
        lambda: _verify(receipt_of(kept), document, platform, anchor, response=kept),
    )


def test_another_request_is_refused(
    service: SimulatedService,
    document: dict[str, Any],
    platform: SimulatedTdxPlatform,
    anchor: TrustAnchor,
) -> None:
    answer = _answer(service, document)
    other = REQUEST.replace(b"Hi", b"Ho")
    _refused(
        errors.EXIT_BINDING,
        "not these request bytes",
        lambda: _verify(receipt_of(answer), document, platform, anchor, request_bytes=other),
    )


def test_a_receipt_re_signed_by_another_key_is_refused(
    service: SimulatedService,
    document: dict[str, Any],
    platform: SimulatedTdxPlatform,
    anchor: TrustAnchor,
) -> None:
    forged = receipt_fields(document, body_sha256(BODY | {"choices": []}))
    receipt_doc = sign_receipt(forged, Ed25519PrivateKey.generate())
    _refused(
        errors.EXIT_SIGNATURE,
        "signature does not verify against the attested signing key",
        lambda: _verify(receipt_doc, document, platform, anchor),
    )


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("time",), format_time(NOW - timedelta(days=30))),
        (("model",), {"id": "other-model", "sealed": None}),
        (("sampling", "temperature"), "2.0"),
        (("attestation", "tcb_status"), "unverified"),
        (("response_sha256",), "0" * 64),
    ],
    ids=["time", "model", "sampling", "tcb_status", "response"],
)
def test_any_field_altered_without_the_key_breaks_the_signature(
    service: SimulatedService,
    document: dict[str, Any],
    platform: SimulatedTdxPlatform,
    anchor: TrustAnchor,
    path: tuple[str, ...],
    value: Any,
) -> None:
    receipt_doc = json.loads(json.dumps(receipt_of(_answer(service, document))))
    target = receipt_doc["receipt"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    _refused(
        errors.EXIT_SIGNATURE,
        "altered after signing",
        lambda: _verify(receipt_doc, document, platform, anchor),
    )


def test_a_receipt_of_another_boot_is_refused_with_this_attestation(
    service: SimulatedService,
    document: dict[str, Any],
    platform: SimulatedTdxPlatform,
    anchor: TrustAnchor,
) -> None:
    """The same TD booted again (same measurements, new keys) signed it: it names its own
    quote, and pointing it at ours breaks its signature."""
    other = SimulatedService(platform)
    other_document = other.answer(RECEIPTS_NONCE, collateral=platform.collateral_json())
    foreign = receipt_of(_answer(other, other_document))
    _verify(foreign, other_document, platform, anchor)  # genuine with its own document
    _refused(
        errors.EXIT_BINDING,
        "another boot or another TD",
        lambda: _verify(foreign, document, platform, anchor),
    )
    repointed = json.loads(json.dumps(foreign))
    ours = receipt_fields(document, "0" * 64)["attestation"]["quote_sha256"]
    repointed["receipt"]["attestation"]["quote_sha256"] = ours
    _refused(
        errors.EXIT_SIGNATURE,
        "signed by another key",
        lambda: _verify(repointed, document, platform, anchor),
    )


def test_a_receipt_of_another_td_is_refused_by_the_reference_values(
    platform: SimulatedTdxPlatform, anchor: TrustAnchor
) -> None:
    """A TD the policy does not name (another MRTD) made both the receipt and its document."""
    rogue = SimulatedService(platform, SyntheticTdFields(mr_td=b"\x66" * 48))
    rogue_document = rogue.answer(RECEIPTS_NONCE, collateral=platform.collateral_json())
    receipt_doc = receipt_of(_answer(rogue, rogue_document))
    with pytest.raises(ReceiptRefused, match="not the TD of policy") as caught:
        _verify(receipt_doc, rogue_document, platform, anchor)
    assert caught.value.exit_code == errors.EXIT_POLICY


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("model", {"id": "other-model", "sealed": None}),
        ("profile", "split"),
        ("reference_values_id", "someone-elses-release"),
    ],
)
def test_a_receipt_claiming_other_claims_than_the_attested_ones_is_refused(
    service: SimulatedService,
    document: dict[str, Any],
    platform: SimulatedTdxPlatform,
    anchor: TrustAnchor,
    name: str,
    value: Any,
) -> None:
    """Even signed by the attested key, a receipt may not claim what the quote does not bind."""
    receipt_doc = receipt_of(_answer(service, document, **{name: value}))
    _refused(
        errors.EXIT_BINDING,
        f"it claims {name} .*, the attestation binds",
        lambda: _verify(receipt_doc, document, platform, anchor),
    )


def test_an_attestation_document_for_another_nonce_is_refused(
    service: SimulatedService,
    document: dict[str, Any],
    platform: SimulatedTdxPlatform,
    anchor: TrustAnchor,
) -> None:
    receipt_doc = receipt_of(_answer(service, document))
    client_nonce = "ab" * 32
    plain = service.answer(client_nonce, collateral=platform.collateral_json())
    _refused(
        errors.EXIT_BINDING,
        "not the receipts nonce",
        lambda: _verify(receipt_doc, plain, platform, anchor),
    )
    relabelled = plain | {"nonce": RECEIPTS_NONCE}  # REPORTDATA still binds the client's nonce
    _refused(
        errors.EXIT_BINDING,
        "REPORTDATA does not bind",
        lambda: _verify(receipt_doc, relabelled, platform, anchor),
    )


def test_a_tcb_status_the_verifier_does_not_reproduce_is_refused(
    service: SimulatedService,
    document: dict[str, Any],
    platform: SimulatedTdxPlatform,
    anchor: TrustAnchor,
) -> None:
    attestation = receipt_fields(document, "0" * 64)["attestation"]
    stated = _answer(service, document, attestation=attestation | {"tcb_status": "OutOfDate"})
    _refused(
        errors.EXIT_TCB,
        "states TCB status OutOfDate, the quote verifies as UpToDate",
        lambda: _verify(receipt_of(stated), document, platform, anchor),
    )
    unverified = _answer(service, document, attestation=attestation | {"tcb_status": "unverified"})
    _verify(receipt_of(unverified), document, platform, anchor)


def test_a_receipt_dated_after_the_verification_time_is_refused(
    service: SimulatedService,
    document: dict[str, Any],
    platform: SimulatedTdxPlatform,
    anchor: TrustAnchor,
) -> None:
    later = _answer(service, document, time=format_time(NOW + timedelta(hours=1)))
    _refused(
        errors.EXIT_BINDING,
        "after the verification time",
        lambda: _verify(receipt_of(later), document, platform, anchor),
    )


@pytest.mark.parametrize(
    "receipt_doc",
    [
        None,
        {"receipt": {}, "signature": ""},
        {"receipt": {"schema": "tdllm-receipt/0"}, "signature": "AA"},
    ],
    ids=["not-an-object", "empty", "other-schema"],
)
def test_what_is_not_a_receipt_is_malformed(
    document: dict[str, Any],
    platform: SimulatedTdxPlatform,
    anchor: TrustAnchor,
    receipt_doc: Any,
) -> None:
    _refused(errors.EXIT_PARSE, "receipt", lambda: _verify(receipt_doc, document, platform, anchor))


def test_without_reference_values_it_refuses_unless_any_td_is_accepted(
    service: SimulatedService,
    document: dict[str, Any],
    platform: SimulatedTdxPlatform,
    anchor: TrustAnchor,
) -> None:
    receipt_doc = receipt_of(_answer(service, document))
    with pytest.raises(ReceiptRefused, match="no reference-values policy"):
        _verify(receipt_doc, document, platform, anchor, policy=None)
    verified = _verify(receipt_doc, document, platform, anchor, policy=None, insecure_any_td=True)
    assert verified.attested.policy_name is None
