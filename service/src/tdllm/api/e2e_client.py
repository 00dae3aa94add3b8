"""Client of the end-to-end encrypted mode: attest first, then talk only in ciphertext.

`E2eClient.chat` fetches /v1/attestation with a fresh nonce, verifies it (`attest_client`),
encrypts the request to the attested key and decrypts the answer. The HTTP layer is a
`Transport` so tests can record every byte that crosses the "network".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import requests

from tdllm.api.attest_client import (
    AttestationRefused,
    AttestedService,
    new_nonce,
    verify_attestation,
)
from tdllm.api.e2e_protocol import E2eDecryptError, open_response, seal_request
from tdllm.errors import TdllmError
from tdllm_attest.trust import TrustAnchor


class E2eError(TdllmError):
    """The encrypted exchange failed (tampered answer, service error); one line for people."""


class Transport(Protocol):
    def get(self, path: str, params: dict[str, str]) -> Any: ...
    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]: ...


@dataclass
class RequestsTransport:
    base_url: str
    timeout_s: float = 300.0

    def get(self, path: str, params: dict[str, str]) -> Any:
        return requests.get(self.base_url + path, params=params, timeout=self.timeout_s).json()

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        resp = requests.post(self.base_url + path, json=body, timeout=self.timeout_s)
        return resp.status_code, resp.json()


@dataclass
class E2eClient:
    transport: Transport
    anchor: TrustAnchor
    attested: AttestedService | None = None

    def attest(self) -> AttestedService:
        nonce = new_nonce()
        try:
            doc = self.transport.get("/v1/attestation", {"nonce": nonce})
        except (requests.RequestException, ValueError) as exc:
            raise AttestationRefused(
                f"cannot fetch the attestation ({type(exc).__name__})"
            ) from None
        self.attested = verify_attestation(doc, nonce, self.anchor)
        return self.attested

    def chat(self, messages: list[dict[str, str]], **options: Any) -> dict[str, Any]:
        """The plain OpenAI chat.completion document, exchanged encrypted."""
        attested = self.attested or self.attest()
        if "model" not in options:  # the model list is public; only the exchange is secret
            options["model"] = self.transport.get("/v1/models", {})["data"][0]["id"]
        payload = {"messages": messages, **options}
        envelope, key = seal_request(attested.public_key, payload)
        status, doc = self.transport.post("/v1/e2e/chat/completions", envelope)
        if status != 200:
            message = doc.get("error", {}).get("message") if isinstance(doc, dict) else None
            raise E2eError(f"the service refused the encrypted request ({status}): {message}")
        try:
            inner_status, body = open_response(key, doc)
        except E2eDecryptError as exc:
            raise E2eError(str(exc)) from None
        if inner_status != 200 or not isinstance(body, dict):
            message = body.get("error", {}).get("message") if isinstance(body, dict) else None
            raise E2eError(f"the service answered {inner_status}: {message}")
        return body
