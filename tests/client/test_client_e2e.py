"""`E2eClient` without the service: what it seals, and how a broken network ends."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from tdllm_attest.client import E2eClient, E2eError, anchor_for
from tdllm_attest.client.e2e_protocol import open_request, parse_request
from tdllm_attest.testing.platform import SimulatedTdxPlatform
from tests.client.reference_policy import policy_for
from tests.client.simulated_service import MODEL, SimulatedService

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
API_KEY = "client-test-key-" + "k" * 16


@dataclass
class BrokenPipe:
    """Attests like the service, keeps every envelope, then loses the connection."""

    service: SimulatedService
    paths: list[str] = field(default_factory=list)
    envelopes: list[dict[str, Any]] = field(default_factory=list)

    def get(self, path: str, params: dict[str, str]) -> Any:
        self.paths.append(path)
        return self.service.answer(
            params["nonce"], collateral=self.service.platform.collateral_json()
        )

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        self.envelopes.append(body)
        raise requests.ConnectionError("reset by peer")

    def post_stream(self, path: str, body: dict[str, Any]) -> tuple[int, Iterator[bytes]]:
        self.envelopes.append(body)
        raise requests.ConnectionError("reset by peer")


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(datetime.now(UTC))


@pytest.mark.parametrize("stream", [False, True], ids=["whole answer", "stream"])
def test_a_lost_connection_is_an_e2e_error_after_sealing_the_attested_model_and_key(
    platform: SimulatedTdxPlatform, stream: bool
) -> None:
    service = SimulatedService(platform)
    pipe = BrokenPipe(service)
    anchor = anchor_for(platform.root_der, {"TDLLM_ALLOW_SIMULATED_TDX": "1"})
    client = E2eClient(pipe, anchor, policy=policy_for(platform), api_key=API_KEY)
    messages = [{"role": "user", "content": "hello"}]
    with pytest.raises(E2eError, match=r"the encrypted exchange failed \(ConnectionError\)"):
        if stream:
            list(client.chat_stream(messages, max_tokens=2))
        else:
            client.chat(messages, max_tokens=2)
    assert pipe.paths == ["/v1/attestation"]  # the model id came from the attestation
    private = service.key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    plaintext, _keys = open_request(private, pipe.envelopes[-1])
    sealed = parse_request(plaintext)
    assert sealed.api_key == API_KEY
    assert sealed.request["model"] == MODEL["id"] and sealed.request["stream"] is stream
