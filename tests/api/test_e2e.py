"""End-to-end encrypted mode: only ciphertext on the wire; tampering makes the client refuse."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tdllm.api.app import create_app
from tdllm.api.boot import BootDeps
from tdllm.api.runner import EngineRunner
from tdllm_attest.client import AttestationRefused, E2eClient, E2eError, anchor_for
from tdllm_attest.testing.platform import SimulatedTdxPlatform
from tdllm_attest.testing.provider import SimulatedProvider
from tdllm_attest.wire import b64url, from_b64url
from tests.api.conftest import api_settings
from tests.api.e2e_transport import Events, RecordingTransport
from tests.client.reference_policy import policy_for

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
SIMULATED = {"TDLLM_ALLOW_SIMULATED_TDX": "1"}
PROMPT = "Describe the purple zebra of Quillhaven"


def _flip(text: str) -> str:
    raw = bytearray(from_b64url(text))
    raw[-1] ^= 1
    return b64url(bytes(raw))


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(datetime.now(UTC))


@pytest.fixture
def transport(runner: EngineRunner, platform: SimulatedTdxPlatform) -> RecordingTransport:
    deps = BootDeps(
        quote_provider=SimulatedProvider(platform),
        collateral=lambda _quote: platform.collateral_json(),
    )
    # a record per chunk: the tamper cases below address single records
    settings = api_settings(attestation="simulated", allow_simulated=True, e2e_record_interval_ms=0)
    app = create_app(settings, engine_runner=runner, boot_deps=deps)
    return RecordingTransport(app.test_client())


def _client(transport: RecordingTransport, platform: SimulatedTdxPlatform) -> E2eClient:
    # the reference values of SimulatedProvider's default TD, which the service runs as
    anchor = anchor_for(platform.root_der, SIMULATED)
    return E2eClient(transport, anchor, policy=policy_for(platform))


def _ask(client: E2eClient) -> dict[str, Any]:
    messages = [{"role": "user", "content": PROMPT}]
    return client.chat(messages, max_tokens=8, temperature=0)


def _ask_streamed(client: E2eClient, **options: Any) -> str:
    messages = [{"role": "user", "content": PROMPT}]
    chunks = client.chat_stream(messages, **({"max_tokens": 8, "temperature": 0} | options))
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def _assert_no_plaintext(wire: list[bytes], answer: str) -> None:
    joined = b"".join(wire)
    for secret in (PROMPT, "Quillhaven", answer.strip()[:12]):
        # JSON would carry non-ASCII as \u escapes: neither form may appear
        assert secret.encode() not in joined
        assert json.dumps(secret)[1:-1].encode() not in joined
    for marker in (b"chat.completion", b"messages", b"delta", b"finish_reason"):
        assert marker not in joined


def test_the_wire_carries_neither_prompt_nor_answer(
    transport: RecordingTransport, platform: SimulatedTdxPlatform
) -> None:
    answer = _ask(_client(transport, platform))
    text = answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] >= 1 and text
    _assert_no_plaintext(transport.wire, text)


def test_a_streamed_answer_equals_the_whole_answer_and_never_crosses_the_wire_in_clear(
    transport: RecordingTransport, platform: SimulatedTdxPlatform
) -> None:
    client = _client(transport, platform)
    streamed = _ask_streamed(client)
    whole = _ask(client)["choices"][0]["message"]["content"]
    assert streamed == whole and streamed
    _assert_no_plaintext(transport.wire, streamed)
    (records,) = transport.streams
    assert len(records) >= 3 and [r["final"] for r in records] == [False] * (len(records) - 1) + [
        True
    ]
    # every record is padded to the 1 KiB bucket: token lengths do not show in ciphertext sizes;
    # only the last chunk's, which carries the receipt, is 2 KiB (the final record shows the end)
    sizes = [len(from_b64url(r["ciphertext"])) - 16 for r in records]
    assert sizes == [1024] * (len(records) - 2) + [2048, 1024]


def test_stream_usage_chunks_arrive_sealed_too(
    transport: RecordingTransport, platform: SimulatedTdxPlatform
) -> None:
    client = _client(transport, platform)
    messages = [{"role": "user", "content": PROMPT}]
    chunks = list(
        client.chat_stream(
            messages, max_tokens=4, temperature=0, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_a_tampered_answer_is_refused(
    transport: RecordingTransport, platform: SimulatedTdxPlatform
) -> None:
    transport.tamper_answer = lambda doc: doc | {"ciphertext": _flip(doc["ciphertext"])}
    with pytest.raises(E2eError, match="signature does not verify"):
        _ask(_client(transport, platform))


def test_a_forged_answer_signature_is_refused(
    transport: RecordingTransport, platform: SimulatedTdxPlatform
) -> None:
    transport.tamper_answer = lambda doc: doc | {"signature": _flip(doc["signature"])}
    with pytest.raises(E2eError, match="signature does not verify"):
        _ask(_client(transport, platform))


def test_an_answer_signed_by_a_key_the_quote_does_not_bind_is_refused(
    transport: RecordingTransport, platform: SimulatedTdxPlatform
) -> None:
    other = Ed25519PrivateKey.generate()
    transport.tamper_answer = lambda doc: doc | {"signature": b64url(other.sign(b"x"))}
    with pytest.raises(E2eError, match="signature does not verify"):
        _ask(_client(transport, platform))


def test_an_unsigned_answer_is_refused(
    transport: RecordingTransport, platform: SimulatedTdxPlatform
) -> None:
    transport.tamper_answer = lambda doc: {k: v for k, v in doc.items() if k != "signature"}
    with pytest.raises(E2eError, match="not a signed"):
        _ask(_client(transport, platform))


def test_a_tampered_request_is_refused_by_the_service(
    transport: RecordingTransport, platform: SimulatedTdxPlatform
) -> None:
    transport.tamper_post = lambda body: body | {"ciphertext": _flip(body["ciphertext"])}
    with pytest.raises(E2eError, match="400"):
        _ask(_client(transport, platform))


def test_an_attestation_for_another_nonce_is_refused(
    transport: RecordingTransport, platform: SimulatedTdxPlatform
) -> None:
    transport.tamper_get = lambda doc: doc | {"nonce": "00" * 32}
    with pytest.raises(AttestationRefused, match="nonce"):
        _ask(_client(transport, platform))


@pytest.mark.parametrize(
    ("name", "crv"), [("service_public_key", "X25519"), ("signing_public_key", "Ed25519")]
)
def test_a_swapped_service_key_is_refused(
    transport: RecordingTransport, platform: SimulatedTdxPlatform, name: str, crv: str
) -> None:
    other = {"kty": "OKP", "crv": crv, "x": b64url(bytes(range(32)))}
    transport.tamper_get = lambda doc: doc | {name: other} if "quote" in doc else doc
    with pytest.raises(AttestationRefused, match="REPORTDATA"):
        _ask(_client(transport, platform))
    assert all(b"ciphertext" not in chunk for chunk in transport.wire)


def test_a_tampered_quote_is_refused(
    transport: RecordingTransport, platform: SimulatedTdxPlatform
) -> None:
    transport.tamper_get = lambda doc: (
        doc | {"quote": _flip(doc["quote"])} if "quote" in doc else doc
    )
    with pytest.raises(AttestationRefused):
        _ask_streamed(_client(transport, platform))
    assert all(b"ciphertext" not in chunk for chunk in transport.wire)


def test_a_simulated_root_is_refused_without_the_switch(platform: SimulatedTdxPlatform) -> None:
    with pytest.raises(AttestationRefused, match="TDLLM_ALLOW_SIMULATED_TDX"):
        anchor_for(platform.root_der, {})


def _swap(events: Events) -> Events:
    return [events[0], events[2], events[1], *events[3:]]


def _flip_record(i: int) -> Callable[[Events], Events]:
    def tamper(events: Events) -> Events:
        events[i] = events[i] | {"ciphertext": _flip(events[i]["ciphertext"])}
        return events

    return tamper


def _falsely_final(events: Events) -> Events:
    return [*events[:2], events[2] | {"final": True, "signature": events[-1]["signature"]}]


@pytest.mark.parametrize(
    ("tamper", "refusal"),
    [
        pytest.param(_swap, "record 1 does not decrypt", id="reordered"),
        pytest.param(lambda e: [e[0], *e[2:]], "record 1 does not decrypt", id="dropped"),
        pytest.param(lambda e: e[:-1], "truncated", id="final record cut"),
        pytest.param(lambda e: e[:2], "truncated", id="cut mid-stream"),
        pytest.param(_flip_record(1), "record 1 does not decrypt", id="ciphertext bit flip"),
        pytest.param(_flip_record(-1), "record .* does not decrypt", id="final record bit flip"),
        pytest.param(_falsely_final, "record 2 does not decrypt", id="chunk marked final"),
        pytest.param(lambda e: [*e, e[1]], "after its final record", id="record after final"),
        pytest.param(
            lambda e: [*e[:-1], e[-1] | {"signature": _flip(e[-1]["signature"])}],
            "signature does not verify",
            id="forged final signature",
        ),
        pytest.param(
            lambda e: [*e[:-1], {k: v for k, v in e[-1].items() if k != "signature"}],
            "carries no signature",
            id="unsigned final record",
        ),
    ],
)
def test_a_tampered_stream_is_refused(
    transport: RecordingTransport,
    platform: SimulatedTdxPlatform,
    tamper: Callable[[Events], Events],
    refusal: str,
) -> None:
    transport.tamper_records = tamper
    with pytest.raises(E2eError, match=refusal):
        _ask_streamed(_client(transport, platform))


def test_a_record_from_another_stream_is_refused(
    transport: RecordingTransport, platform: SimulatedTdxPlatform
) -> None:
    client = _client(transport, platform)
    _ask_streamed(client)
    earlier = transport.streams[0]
    transport.tamper_records = lambda events: [events[0], earlier[1], *events[2:]]
    with pytest.raises(E2eError, match="record 1 does not decrypt"):
        _ask_streamed(client)


def test_a_streamed_request_the_service_rejects_ends_in_a_signed_error(
    transport: RecordingTransport, platform: SimulatedTdxPlatform
) -> None:
    with pytest.raises(E2eError, match=r"answered 400: .*max_tokens"):
        _ask_streamed(_client(transport, platform), max_tokens=100_000)
    (records,) = transport.streams
    assert len(records) == 1 and records[0]["final"] is True


def test_e2e_logs_hold_neither_prompt_nor_answer(
    transport: RecordingTransport, platform: SimulatedTdxPlatform, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = _client(transport, platform)
    answers = [_ask_streamed(client), _ask(client)["choices"][0]["message"]["content"]]
    with pytest.raises(E2eError, match="400"):
        _ask_streamed(client, max_tokens=100_000)  # an error answer echoes nothing either
    assert any(r.name == "tdllm.api.access" for r in caplog.records)
    for record in caplog.records:
        for secret in ("Quillhaven", *(a.strip()[:12] for a in answers)):
            assert secret not in record.getMessage()
            assert secret not in str(getattr(record, "fields", ""))
