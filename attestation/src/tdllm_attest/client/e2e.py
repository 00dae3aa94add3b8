"""Client of the end-to-end encrypted mode: attest first, then talk only in ciphertext.

`E2eClient.chat` fetches /v1/attestation with a fresh nonce, verifies it (`client.attest`),
encrypts the request (and the API key, which travels only inside the envelope) to the attested
key, checks the answer's signature against the attested signing key and decrypts it.
`E2eClient.chat_stream` does the same for ``stream: true``: it authenticates each sealed record
as it arrives and only then yields the chunks it carries; the stream only counts as complete once
its signed final record has verified. The HTTP layer is a `Transport` so tests can record every
byte that crosses the "network".

Every answer carries the service's receipt (`receipt_protocol`): the whole body's
``tdllm_receipt``, or the last chunk's. Its request digest covers `E2eClient.last_request`, the
exact bytes the TD's chat handler received; `receipt_attestation` fetches the document to check
it against (`tdllm_attest.client.receipt.verify_receipt`, `tdllm-verify receipt`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import requests

from tdllm_attest.client.attest import (
    AttestedService,
    new_nonce,
    require_e2e_profile,
    verify_attestation,
)
from tdllm_attest.client.e2e_protocol import (
    PROTOCOL,
    E2eDecryptError,
    ExchangeKeys,
    StreamOpener,
    open_response,
    seal_request,
)
from tdllm_attest.client.errors import AttestationRefused, E2eError, E2eServiceError
from tdllm_attest.client.receipt_protocol import RECEIPTS_PATH
from tdllm_attest.collateral import CollateralSource
from tdllm_attest.gpu.anchors import GpuAnchors
from tdllm_attest.gpu.rim import RimStore
from tdllm_attest.policy_format import Policy
from tdllm_attest.trust import TrustAnchor
from tdllm_attest.wire import canonical_json

PATH = "/v1/e2e/chat/completions"
MAX_EVENT_BYTES = 1 << 20  # one sealed record: the chunks of one tick, a few KiB


class Transport(Protocol):
    def get(self, path: str, params: dict[str, str]) -> Any: ...
    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]: ...
    def post_stream(self, path: str, body: dict[str, Any]) -> tuple[int, Iterator[bytes]]:
        """(status, the response body's lines without their line ends)."""
        ...


@dataclass
class RequestsTransport:
    base_url: str
    timeout_s: float = 300.0

    def get(self, path: str, params: dict[str, str]) -> Any:
        return requests.get(self.base_url + path, params=params, timeout=self.timeout_s).json()

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        resp = requests.post(self.base_url + path, json=body, timeout=self.timeout_s)
        return resp.status_code, resp.json()

    def post_stream(self, path: str, body: dict[str, Any]) -> tuple[int, Iterator[bytes]]:
        resp = requests.post(self.base_url + path, json=body, timeout=self.timeout_s, stream=True)
        return resp.status_code, resp.iter_lines()


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class E2eClient:
    transport: Transport
    anchor: TrustAnchor
    attested: AttestedService | None = None
    clock: Callable[[], datetime] = field(default=_now)
    # the TD's reference values; without them attest() refuses unless insecure_any_td is set
    policy: Policy | None = None
    insecure_any_td: bool = False
    api_key: str | None = None  # sealed into every request, never sent as a header
    # our own collateral (a PCCS, a file); None: the collateral the service serves, via its host
    collateral_source: CollateralSource | None = None
    # gpu-cc services: NVIDIA's RIMs for their GPUs and the GPU roots (default: NVIDIA's)
    gpu_rims: RimStore | None = None
    gpu_anchors: GpuAnchors | None = None
    # the exact body the TD's chat handler got for the last request: what receipts digest
    last_request: bytes | None = field(default=None, repr=False)

    def attest(self) -> AttestedService:
        """Verify the service (quote, reference values, bound claims) and that its profile keeps
        prompts in the TD; only then is anything sealed to its key."""
        nonce = new_nonce()
        try:
            doc = self.transport.get("/v1/attestation", {"nonce": nonce})
        except (requests.RequestException, ValueError) as exc:
            raise AttestationRefused(
                f"cannot fetch the attestation ({type(exc).__name__})"
            ) from None
        attested = verify_attestation(
            doc,
            nonce,
            self.anchor,
            now=self.clock(),
            policy=self.policy,
            insecure_any_td=self.insecure_any_td,
            collateral_source=self.collateral_source,
            gpu_rims=self.gpu_rims,
            gpu_anchors=self.gpu_anchors,
        )
        require_e2e_profile(attested)
        self.attested = attested
        return attested

    def receipt_attestation(self) -> Any:
        """The service's receipt attestation document (unverified: `verify_receipt` checks it)."""
        try:
            return self.transport.get(RECEIPTS_PATH, {})
        except (requests.RequestException, ValueError) as exc:
            raise E2eError(f"cannot fetch the receipt attestation ({type(exc).__name__})") from None

    def chat(self, messages: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
        """The plain OpenAI chat.completion document, exchanged encrypted and signed.

        `options` are the chat request's other fields, sealed as given (tools, tool_choice,
        response_format, logprobs, n, seed, ...): the TD runs the plain chat handler on them.
        The TD's own refusal (a 4xx) raises `E2eServiceError` with its status and error object.
        """
        attested, envelope, keys = self._seal(messages, options | {"stream": False})
        try:
            status, doc = self.transport.post(PATH, envelope)
        except (requests.RequestException, ValueError) as exc:
            raise E2eError(f"the encrypted exchange failed ({type(exc).__name__})") from None
        if status != 200:
            raise E2eError(f"the service refused the encrypted request ({status}): {_message(doc)}")
        try:
            inner_status, body = open_response(keys, attested.signing_key, doc)
        except E2eDecryptError as exc:
            raise E2eError(str(exc)) from None
        if inner_status != 200 or not isinstance(body, dict):
            raise E2eServiceError(inner_status, _error(body))
        return body

    def chat_stream(
        self, messages: list[dict[str, Any]], **options: Any
    ) -> Iterator[dict[str, Any]]:
        """The plain chat.completion.chunk documents, each decrypted as it arrives (every
        choice's, tool-call deltas and logprobs included, exactly as the plain stream has them).

        Raises `E2eError` on the first record that does not authenticate in sequence and at the
        end when the signed final record is missing or wrong; `E2eServiceError` (authenticated)
        on a refusal before any token or an in-band error chunk.
        """
        attested, envelope, keys = self._seal(messages, options | {"stream": True})
        try:
            status, lines = self.transport.post_stream(PATH, envelope)
        except requests.RequestException as exc:
            raise E2eError(f"the encrypted exchange failed ({type(exc).__name__})") from None
        if status != 200:
            doc = _json(b"".join(lines))
            raise E2eError(f"the service refused the encrypted request ({status}): {_message(doc)}")
        yield from _open_stream(lines, StreamOpener(keys, attested.signing_key))

    def _seal(
        self, messages: list[dict[str, Any]], options: dict[str, Any]
    ) -> tuple[AttestedService, dict[str, str], ExchangeKeys]:
        attested = self.attested or self.attest()
        if "model" not in options:
            options["model"] = self._served_model(attested)
        request = {"messages": messages, **options}
        try:
            self.last_request = canonical_json(request)  # the service dispatches exactly this
        except ValueError:
            raise E2eError("the request holds NaN or an infinity: not JSON") from None
        envelope, keys = seal_request(attested.public_key, request, self.api_key)
        return attested, envelope, keys

    def _served_model(self, attested: AttestedService) -> str:
        """The model id the attestation binds; else the first of the public model list (which
        asks for an API key in clear where keys are configured, so it is the fallback)."""
        bound = attested.model.get("id") if attested.model is not None else None
        if isinstance(bound, str):
            return bound
        try:
            model: str = self.transport.get("/v1/models", {})["data"][0]["id"]
        except (requests.RequestException, ValueError, LookupError, TypeError):
            raise E2eError("cannot list the served model: pass model=...") from None
        return model


def _open_stream(lines: Iterator[bytes], opener: StreamOpener) -> Iterator[dict[str, Any]]:
    try:
        for line in lines:
            if not line:
                continue  # the blank line between events
            if len(line) > MAX_EVENT_BYTES or not line.startswith(b"data: "):
                raise E2eDecryptError(f"the encrypted stream is not {PROTOCOL} records")
            # the whole record authenticates (AEAD, in sequence) before any chunk is shown
            final, value = opener.open(_json(line[len(b"data: ") :]))
            if final:
                if value["status"] != 200:
                    raise E2eServiceError(value["status"], _error(value["body"]))
                continue  # anything after this is refused by the opener
            yield from _chunks(value)
        opener.finish()
    except E2eDecryptError as exc:
        raise E2eError(str(exc)) from None
    except requests.RequestException as exc:
        raise E2eError(f"the encrypted stream broke off ({type(exc).__name__})") from None


def _chunks(chunks: list[Any]) -> Iterator[dict[str, Any]]:
    """The chunks one record carries (a tick's worth); an in-band error ends the stream."""
    for chunk in chunks:
        if not isinstance(chunk, dict) or "error" in chunk:
            raise E2eServiceError(None, _error(chunk))
        yield chunk


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _error(doc: Any) -> dict[str, Any] | None:
    """The OpenAI error object of an authenticated error body, if it has one."""
    error = doc.get("error") if isinstance(doc, dict) else None
    return error if isinstance(error, dict) else None


def _message(doc: Any) -> Any:
    error = doc.get("error") if isinstance(doc, dict) else None
    return error.get("message") if isinstance(error, dict) else None
