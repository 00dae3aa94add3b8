"""End-to-end encrypted mode: only ciphertext on the wire; tampering makes the client refuse."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from flask.testing import FlaskClient

from tdllm.api.app import create_app
from tdllm.api.attest_client import AttestationRefused, anchor_for
from tdllm.api.boot import BootDeps
from tdllm.api.e2e_client import E2eClient, E2eError
from tdllm.api.runner import EngineRunner
from tdllm_attest.broker.protocol import b64url, from_b64url
from tdllm_attest.quote import SimulatedProvider
from tdllm_attest.simulated import SimulatedTdxPlatform
from tests.api.conftest import api_settings

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
SIMULATED = {"TDLLM_ALLOW_SIMULATED_TDX": "1"}
PROMPT = "Describe the purple zebra of Quillhaven"


def _flip(text: str) -> str:
    raw = bytearray(from_b64url(text))
    raw[-1] ^= 1
    return b64url(bytes(raw))


@dataclass
class RecordingTransport:
    """The client's network, recorded: every byte sent and received lands in `wire`."""

    client: FlaskClient
    wire: list[bytes] = field(default_factory=list)
    tamper_get: Any = None
    tamper_post: Any = None
    tamper_answer: Any = None

    def get(self, path: str, params: dict[str, str]) -> Any:
        resp = self.client.get(path, query_string=params)
        self.wire += [json.dumps(params).encode(), resp.data]
        doc = resp.get_json()
        return self.tamper_get(doc) if self.tamper_get else doc

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        body = self.tamper_post(body) if self.tamper_post else body
        resp = self.client.post(path, json=body)
        self.wire += [json.dumps(body).encode(), resp.data]
        doc = resp.get_json()
        return resp.status_code, self.tamper_answer(doc) if self.tamper_answer else doc


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(datetime.now(UTC))


@pytest.fixture
def transport(runner: EngineRunner, platform: SimulatedTdxPlatform) -> RecordingTransport:
    deps = BootDeps(
        quote_provider=SimulatedProvider(platform),
        collateral=lambda _quote: platform.collateral_json(),
    )
    settings = api_settings(attestation="simulated", allow_simulated=True)
    app = create_app(settings, engine_runner=runner, boot_deps=deps)
    return RecordingTransport(app.test_client())


def _client(transport: RecordingTransport, platform: SimulatedTdxPlatform) -> E2eClient:
    return E2eClient(transport, anchor_for(platform.root_der, SIMULATED))


def _ask(client: E2eClient) -> dict[str, Any]:
    messages = [{"role": "user", "content": PROMPT}]
    return client.chat(messages, max_tokens=8, temperature=0)


def test_the_wire_carries_neither_prompt_nor_answer(
    transport: RecordingTransport, platform: SimulatedTdxPlatform
) -> None:
    answer = _ask(_client(transport, platform))
    text = answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] >= 1 and text
    wire = b"".join(transport.wire)
    for secret in (PROMPT, "Quillhaven", text.strip()[:12]):
        assert secret.encode() not in wire
    assert b"chat.completion" not in wire and b"messages" not in wire


def test_a_tampered_answer_is_refused(
    transport: RecordingTransport, platform: SimulatedTdxPlatform
) -> None:
    transport.tamper_answer = lambda doc: doc | {"ciphertext": _flip(doc["ciphertext"])}
    with pytest.raises(E2eError, match="does not decrypt"):
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


def test_a_swapped_service_key_is_refused(
    transport: RecordingTransport, platform: SimulatedTdxPlatform
) -> None:
    other = {"kty": "OKP", "crv": "X25519", "x": b64url(bytes(range(32)))}
    transport.tamper_get = lambda doc: doc | {"service_public_key": other}
    with pytest.raises(AttestationRefused, match="REPORTDATA"):
        _ask(_client(transport, platform))
    assert all(b"ciphertext" not in chunk for chunk in transport.wire)


def test_a_simulated_root_is_refused_without_the_switch(platform: SimulatedTdxPlatform) -> None:
    with pytest.raises(AttestationRefused, match="TDLLM_ALLOW_SIMULATED_TDX"):
        anchor_for(platform.root_der, {})


def test_a_streaming_e2e_request_is_refused_inside_the_envelope(
    transport: RecordingTransport, platform: SimulatedTdxPlatform
) -> None:
    client = _client(transport, platform)
    with pytest.raises(E2eError, match="stream"):
        client.chat([{"role": "user", "content": PROMPT}], stream=True)
