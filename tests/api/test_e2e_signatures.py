"""Response signatures, checked the way a third party would: from docs/api.md's byte layout,
with `cryptography` alone, against the signing key the quote binds (no tdllm e2e code)."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tdllm.api.app import create_app
from tdllm.api.boot import BootDeps
from tdllm.api.runner import EngineRunner
from tdllm_attest.client import E2eClient, anchor_for
from tdllm_attest.testing.platform import SimulatedTdxPlatform
from tdllm_attest.testing.provider import SimulatedProvider
from tests.api.conftest import api_settings
from tests.api.e2e_transport import RecordingTransport
from tests.client.reference_policy import policy_for

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
MESSAGES = [{"role": "user", "content": "Name a colour."}]


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _documented_message(kind: str, request: bytes, response: bytes) -> bytes:
    """docs/api.md: TAG || canonical_json({kind, request_sha256, response_sha256}), with
    `response` starting with the answer's salt."""
    doc = {
        "kind": kind,
        "request_sha256": hashlib.sha256(request).hexdigest(),
        "response_sha256": hashlib.sha256(response).hexdigest(),
    }
    return b"tdllm-e2e/3 signature\x00" + json.dumps(
        doc, sort_keys=True, separators=(",", ":")
    ).encode("utf-8")


class Tap(RecordingTransport):
    """Also keeps the attestation document, the last request envelope and the last answer."""

    attestation: Any = None
    request: Any = None
    answer: Any = None

    def get(self, path: str, params: dict[str, str]) -> Any:
        doc = super().get(path, params)
        if path == "/v1/attestation":
            self.attestation = doc
        return doc

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        self.request = body
        status, self.answer = super().post(path, body)
        return status, self.answer

    def post_stream(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        self.request = body
        return super().post_stream(path, body)


@pytest.fixture
def tap(runner: EngineRunner) -> tuple[Tap, E2eClient]:
    platform = SimulatedTdxPlatform(datetime.now(UTC))
    deps = BootDeps(
        quote_provider=SimulatedProvider(platform),
        collateral=lambda _quote: platform.collateral_json(),
    )
    settings = api_settings(attestation="simulated", allow_simulated=True)
    transport = Tap(create_app(settings, engine_runner=runner, boot_deps=deps).test_client())
    anchor = anchor_for(platform.root_der, {"TDLLM_ALLOW_SIMULATED_TDX": "1"})
    return transport, E2eClient(transport, anchor, policy=policy_for(platform))


def _attested_signing_key(tap: Tap) -> Ed25519PublicKey:
    jwk = tap.attestation["signing_public_key"]  # bound by REPORTDATA, which the client checked
    return Ed25519PublicKey.from_public_bytes(_b64(jwk["x"]))


def _request_bytes(tap: Tap) -> bytes:
    return _b64(tap.request["enc"]) + _b64(tap.request["ciphertext"])


def test_a_whole_answer_signature_verifies_over_the_documented_bytes(
    tap: tuple[Tap, E2eClient],
) -> None:
    transport, client = tap
    client.chat(MESSAGES, max_tokens=4)
    answer = transport.answer
    response = _b64(answer["salt"]) + _b64(answer["nonce"]) + _b64(answer["ciphertext"])
    message = _documented_message("response", _request_bytes(transport), response)
    _attested_signing_key(transport).verify(_b64(answer["signature"]), message)


def test_a_stream_signature_verifies_over_the_documented_transcript(
    tap: tuple[Tap, E2eClient],
) -> None:
    transport, client = tap
    list(client.chat_stream(MESSAGES, max_tokens=4))
    (records,) = transport.streams
    transcript = _b64(records[0]["salt"]) + b"".join(
        len(ct).to_bytes(8, "big") + ct for ct in (_b64(r["ciphertext"]) for r in records)
    )
    message = _documented_message("stream", _request_bytes(transport), transcript)
    _attested_signing_key(transport).verify(_b64(records[-1]["signature"]), message)
