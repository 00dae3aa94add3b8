"""POST /v1/e2e/chat/completions: the encrypted twin of /v1/chat/completions (tdllm-e2e/3).

The envelope is decrypted here, in the TD, with the attested service key (wire format:
`tdllm_attest.client.e2e_protocol`, shared with clients; docs/api.md). An envelope whose HPKE
encapsulation this boot's key has already opened is refused (409 ``e2e_replay``): HPKE base mode
has no replay protection of its own. The sealed request is then dispatched in-process to the
ordinary chat handler (same validation, limits, auth and metrics) with the sealed API key as its
only credential; the outer request's headers are never copied, so a key need not cross the host
in clear. The answer, errors included, is sealed back under a fresh salted key and signed with
the attested signing key.

With ``stream: true`` the chunks of the plain stream are buffered and one padded record leaves per
tick of ``e2e_record_interval_ms``, so the host learns token counts and timing only per tick.
Profiles that show prompts to the untrusted device by design (`split`, `obfuscated`) get no
end-to-end mode at all (403 ``e2e_unavailable``). Nothing decrypted leaves this module except
as ciphertext.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flask import Blueprint, Response, current_app, jsonify, request
from flask.blueprints import BlueprintSetupState
from flask.typing import ResponseReturnValue

from tdllm.api.errors import ApiError, invalid
from tdllm.api.openai import sse
from tdllm.api.openai.strict_json import check_json, decode_json
from tdllm_attest.client.e2e_protocol import (
    E2E_PROFILES,
    E2eDecryptError,
    ExchangeKeys,
    SealedRequest,
    StreamSealer,
    open_request,
    parse_request,
    seal_response,
)
from tdllm_attest.wire import canonical_json

log = logging.getLogger("tdllm.api")
blueprint = Blueprint("e2e", __name__)
REPLAY_CACHE_SIZE = 100_000  # encapsulations remembered per boot (~15 MB), oldest evicted first
_REPLAY_CACHE = "tdllm.e2e.replay_cache"
_DATA = "data: "
_DONE = "[DONE]"
Batches = Generator[list[Any], None, None]  # the chunks of one record, record after record


class ReplayCache:
    """The request encapsulations this boot's service key has opened, oldest evicted first.

    The key is ephemeral per boot and the cache lives as long as it. A replay older than the
    cache is answered again, but under a fresh salt: never with a key or nonce used before.
    """

    def __init__(self, max_entries: int) -> None:
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()  # check-and-insert is one step: two replays race in vain

    def first_use(self, tag: bytes) -> bool:
        with self._lock:
            if tag in self._seen:
                return False
            self._seen[tag] = None
            if len(self._seen) > self._max:
                self._seen.popitem(last=False)
            return True

    def forget(self, tag: bytes) -> None:
        with self._lock:
            self._seen.pop(tag, None)


@blueprint.record_once
def _install_replay_cache(state: BlueprintSetupState) -> None:
    state.app.extensions[_REPLAY_CACHE] = ReplayCache(REPLAY_CACHE_SIZE)


@blueprint.before_request
def _refuse_profiles_that_show_prompts() -> None:
    profile = current_app.extensions["tdllm"].settings.profile
    if profile not in E2E_PROFILES:
        raise ApiError(
            403,
            f"end-to-end encryption is not offered under the {profile!r} profile: it shows "
            f"prompts to the untrusted device by design (only {', '.join(E2E_PROFILES)} "
            "keep them in the trust boundary)",
            "invalid_request_error",
            None,
            "e2e_unavailable",
        )


@blueprint.post("/v1/e2e/chat/completions")
def e2e_chat_completion() -> ResponseReturnValue:
    service = current_app.extensions["tdllm"]
    signer = service.identity.signing_key
    plaintext, keys = _open_first_use(service.identity.private_bytes())
    streamed = _wants_stream(plaintext)
    try:
        sealed = parse_request(plaintext)
    except ValueError as exc:
        return _sealed_whole(keys, signer, streamed, 400, invalid(str(exc)).body())
    try:
        # the plain endpoint's rules for bodies, before canonical_json re-encodes the request
        # (a lone surrogate, NaN or a deep nest would otherwise fail there, as a 500)
        check_json(sealed.request)
    except ApiError as error:
        return _sealed_whole(keys, signer, streamed, error.status, error.body())
    inner = _dispatch(sealed)
    if inner.status_code == 401:  # only authenticated requests keep a place in the cache
        _replays().forget(keys.enc_sha256)
    if inner.mimetype != sse.MIMETYPE:  # a whole answer, or an error before any token
        body = inner.get_json(silent=True)
        inner.close()
        return _sealed_whole(keys, signer, streamed, inner.status_code, body)
    interval_s = service.settings.e2e_record_interval_ms / 1000
    records = _sealed_stream(inner, StreamSealer(keys, signer), interval_s)
    return Response(records, mimetype=sse.MIMETYPE, headers=sse.HEADERS)


def _open_first_use(private_key: bytes) -> tuple[Any, ExchangeKeys]:
    """Decrypt the envelope; refuse one whose encapsulation this key opened before (a replay).

    The cache is consulted only after the HPKE open succeeded, so garbage cannot fill it.
    """
    try:
        envelope = decode_json(request.get_data())
    except ApiError as error:  # the plain endpoints' strict decoding, with this endpoint's code
        raise invalid(error.message, None, "e2e_decrypt_failed") from None
    try:
        plaintext, keys = open_request(private_key, envelope)
    except E2eDecryptError as exc:
        raise invalid(str(exc), None, "e2e_decrypt_failed") from None
    if not _replays().first_use(keys.enc_sha256):
        raise ApiError(
            409,
            "this encrypted request was answered before: replays are refused",
            "invalid_request_error",
            None,
            "e2e_replay",
        )
    return plaintext, keys


def _replays() -> ReplayCache:
    cache: ReplayCache = current_app.extensions[_REPLAY_CACHE]
    return cache


def _wants_stream(plaintext: Any) -> bool:
    inner = plaintext.get("request") if isinstance(plaintext, dict) else None
    return isinstance(inner, dict) and inner.get("stream") is True


def _sealed_whole(
    keys: ExchangeKeys, signer: Ed25519PrivateKey, streamed: bool, status: int, body: Any
) -> Response:
    """A whole answer; a streaming client reads records only, so it gets one final record."""
    if streamed:
        final = StreamSealer(keys, signer).final(status, body)
        return Response(sse.event(final), mimetype=sse.MIMETYPE, headers=sse.HEADERS)
    return jsonify(seal_response(keys, signer, status, body))


def _dispatch(sealed: SealedRequest) -> Response:
    """Run the plain chat handler on the sealed request inside this process, authenticated by
    the sealed API key through the app's own key check (never the outer request's headers).

    Its body is canonical_json(request): bytes the client can recompute, so the receipt's
    request digest inside the sealed answer is checkable (`check_json` has already refused what
    has no canonical bytes: NaN, infinities, lone surrogates).

    A streamed answer's body still runs under this inner request context: the chat handler
    wraps it in `stream_with_context`, which re-enters that context while it is iterated.
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]  # the real app
    headers = {} if sealed.api_key is None else {"Authorization": f"Bearer {sealed.api_key}"}
    body = canonical_json(sealed.request)
    with app.test_request_context(
        "/v1/chat/completions",
        method="POST",
        data=body,
        content_type="application/json",
        headers=headers,
    ):
        response: Response = app.full_dispatch_request()
        return response


@dataclass
class _PlainStream:
    """The chunks of the plain SSE stream; `done` once its ``[DONE]`` went by, `failed` once an
    in-band error event did (a drain deadline sends one before ``[DONE]``)."""

    events: Iterable[bytes | str]
    done: bool = False
    failed: bool = False

    def chunks(self) -> Iterator[Any]:
        for raw in self.events:
            text = raw.decode() if isinstance(raw, bytes) else raw
            for line in text.split("\n"):
                if not line.startswith(_DATA):
                    continue
                data = line[len(_DATA) :]
                if data == _DONE:
                    self.done = True
                else:
                    chunk = json.loads(data)
                    self.failed = self.failed or "error" in chunk
                    yield chunk


def _sealed_stream(inner: Response, sealer: StreamSealer, interval_s: float) -> Iterator[str]:
    """One sealed record per batch of chunks, then a signed final record.

    Without ``[DONE]``, or after an in-band error event (the plain stream stopped early), the
    final record says 502, so a client never mistakes a cut answer for a complete one. Closing
    this generator (the client went away) closes the plain stream, which cancels the sequence in
    the engine.
    """
    plain = _PlainStream(inner.response)
    if interval_s > 0:
        batches = _on_cadence(plain, inner.close, interval_s)
    else:
        batches = _one_per_chunk(plain, inner.close)
    with closing(batches):
        for batch in batches:
            yield sse.event(sealer.record(batch))
    if plain.done and not plain.failed:
        yield sse.event(sealer.final(200, None))
    else:
        error = {"message": "the stream ended early", "type": "server_error"}
        yield sse.event(sealer.final(502, {"error": error}))


def _one_per_chunk(plain: _PlainStream, close: Callable[[], object]) -> Batches:
    """``e2e_record_interval_ms = 0``: a record per chunk, as soon as it exists (tests)."""
    try:
        for chunk in plain.chunks():
            yield [chunk]
    finally:
        close()


_TICK = object()  # the clock struck before another chunk arrived
_END = object()  # the plain stream is over


def _on_cadence(plain: _PlainStream, close: Callable[[], object], interval_s: float) -> Batches:
    """Every chunk made during a tick, once per tick (empty ticks too), until the stream ends;
    the end waits for its tick as well, so neither token times nor the last one show."""
    pump = _Pump(plain.chunks(), close)
    deadline = time.monotonic() + interval_s
    batch: list[Any] = []
    ended = False
    try:
        while True:
            item = pump.next_before(deadline)
            if item is _TICK:
                yield batch
                if ended:
                    return
                batch = []
                # a client that reads slowly delays ticks; it gets no burst of empty records
                deadline = max(deadline + interval_s, time.monotonic())
            elif item is _END:
                ended = True
            else:
                batch.append(item)
    finally:
        pump.stop()


class _Pump:
    """Reads the plain stream on a thread of its own, so records leave on the clock.

    The thread alone iterates and closes the plain stream (a generator waiting for the engine
    cannot be closed from another thread); `stop` makes it close the stream after the next
    chunk, which cancels the sequence in the engine.
    """

    def __init__(self, chunks: Iterator[Any], close: Callable[[], object]) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop = threading.Event()
        thread = threading.Thread(
            target=self._run, args=(chunks, close), name="tdllm-e2e-records", daemon=True
        )
        thread.start()

    def next_before(self, deadline: float) -> Any:
        """The next chunk, `_END`, or `_TICK` when `deadline` (monotonic) passes first."""
        try:
            return self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return _TICK

    def stop(self) -> None:
        self._stop.set()

    def _run(self, chunks: Iterator[Any], close: Callable[[], object]) -> None:
        try:
            for chunk in chunks:
                if self._stop.is_set():
                    break
                self._queue.put(chunk)
        except Exception as exc:  # the type only: a message might quote the answer
            log.error("end-to-end stream failed: %s", type(exc).__name__)
        finally:
            close()
            self._queue.put(_END)
