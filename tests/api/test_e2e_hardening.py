"""The attacks found in the review of tdllm-e2e/2, one test each: a replayed envelope, answer keys
shared between two answers, the API key in clear, request and token counts in sizes and record
counts, and E2E under profiles that show prompts to the untrusted device by design."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from flask import Flask
from werkzeug.serving import make_server

from tdllm.api.app import create_app
from tdllm.api.boot import BootDeps
from tdllm.api.e2e import ReplayCache
from tdllm.api.runner import EngineRunner
from tdllm_attest.client import E2eClient, E2eError, RequestsTransport, Transport, anchor_for
from tdllm_attest.client.e2e_protocol import (
    STREAM_INFO,
    E2eDecryptError,
    StreamOpener,
    StreamSealer,
    answer_key,
    open_request,
    seal_request,
    seal_response,
)
from tdllm_attest.testing.platform import SimulatedTdxPlatform
from tdllm_attest.testing.provider import SimulatedProvider
from tdllm_attest.wire import b64url, from_b64url
from tests.api.conftest import MODEL, api_settings
from tests.api.e2e_transport import Events, RecordingTransport
from tests.api.tcp_recorder import TcpRecorder
from tests.api.test_request_validation import assert_openai_error
from tests.client.reference_policy import policy_for

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
PATH = "/v1/e2e/chat/completions"
API_KEY = "e2e-inner-key-" + "k" * 20
OUTER_KEY = "e2e-outer-key-" + "o" * 20
MESSAGES = [{"role": "user", "content": "Describe the purple zebra of Quillhaven"}]


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(datetime.now(UTC))


@pytest.fixture
def make_app(runner: EngineRunner, platform: SimulatedTdxPlatform) -> Callable[..., Flask]:
    def make(**changes: Any) -> Flask:
        deps = BootDeps(
            quote_provider=SimulatedProvider(platform),
            collateral=lambda _quote: platform.collateral_json(),
        )
        base = {"attestation": "simulated", "allow_simulated": True, "e2e_record_interval_ms": 0}
        return create_app(api_settings(**(base | changes)), engine_runner=runner, boot_deps=deps)

    return make


def _client(transport: Transport, platform: SimulatedTdxPlatform, **kw: Any) -> E2eClient:
    anchor = anchor_for(platform.root_der, {"TDLLM_ALLOW_SIMULATED_TDX": "1"})
    return E2eClient(transport, anchor, policy=policy_for(platform), **kw)


def _ask(client: E2eClient, stream: bool, **options: Any) -> list[dict[str, Any]]:
    options = {"max_tokens": 6, "temperature": 0, "model": MODEL} | options
    if stream:
        return list(client.chat_stream(MESSAGES, **options))
    return [client.chat(MESSAGES, **options)]


class _Keys:
    """A service's two key pairs as raw bytes, without a TD: for protocol-level tests."""

    def __init__(self) -> None:
        self.hpke = X25519PrivateKey.generate()
        self.signer = Ed25519PrivateKey.generate()
        self.public = self.hpke.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.private = self.hpke.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        self.verify = self.signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


# 1. replay -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole answer", "stream"])
def test_a_replayed_envelope_is_refused_before_anything_is_answered_again(
    make_app: Callable[..., Flask], platform: SimulatedTdxPlatform, stream: bool
) -> None:
    transport = RecordingTransport(make_app().test_client())
    _ask(_client(transport, platform), stream)
    (envelope,) = transport.posts
    replay = transport.client.post(PATH, json=envelope)  # the host re-POSTs what it captured
    assert assert_openai_error(replay, 409)["code"] == "e2e_replay"


def test_the_replay_cache_is_bounded_and_admits_each_encapsulation_once_across_threads() -> None:
    cache = ReplayCache(max_entries=3)
    assert [cache.first_use(tag) for tag in (b"a", b"b", b"c", b"d")] == [True] * 4
    assert cache.first_use(b"a")  # evicted as the oldest: answered again, under a fresh salt
    assert not cache.first_use(b"d")
    wins: list[bool] = []
    threads = [
        threading.Thread(target=lambda: wins.append(cache.first_use(b"x"))) for _ in range(16)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == [False] * 15 + [True]


def test_an_envelope_refused_for_its_api_key_holds_no_place_in_the_replay_cache(
    make_app: Callable[..., Flask], platform: SimulatedTdxPlatform
) -> None:
    transport = RecordingTransport(make_app(api_keys=(OUTER_KEY, API_KEY)).test_client())
    transport.headers = {"Authorization": f"Bearer {OUTER_KEY}"}
    with pytest.raises(E2eError, match="answered 401"):
        _ask(_client(transport, platform, api_key="wrong-" + API_KEY), stream=False)
    (envelope,) = transport.posts
    again = transport.client.post(PATH, json=envelope, headers=transport.headers)
    assert again.status_code == 200  # a sealed 401 again, not 409: it never reached the model


def test_two_answers_to_one_request_never_share_keys_or_nonces() -> None:
    # the service's replay cache is bypassed here: the key schedule alone must prevent reuse
    keys = _Keys()
    envelope, _ = seal_request(keys.public, {"model": MODEL, "messages": MESSAGES})
    _, server_keys = open_request(keys.private, envelope)
    chunk = [{"choices": [{"delta": {"content": "same words"}}]}]
    first, second = (StreamSealer(server_keys, keys.signer).record(chunk) for _ in range(2))
    assert first["ciphertext"] != second["ciphertext"]  # equal would be one keystream, twice
    salts = [from_b64url(record["salt"]) for record in (first, second)]
    assert len({answer_key(server_keys, salt, STREAM_INFO) for salt in salts}) == 2
    answers = [seal_response(server_keys, keys.signer, 200, {"same": "body"}) for _ in range(2)]
    assert answers[0]["salt"] != answers[1]["salt"]
    assert answers[0]["ciphertext"] != answers[1]["ciphertext"]


def test_a_record_spliced_from_another_answer_to_the_same_request_is_refused() -> None:
    keys = _Keys()
    envelope, client_keys = seal_request(keys.public, {"model": MODEL, "messages": MESSAGES})
    _, server_keys = open_request(keys.private, envelope)
    answers = [StreamSealer(server_keys, keys.signer) for _ in range(2)]
    records = [[answer.record([{"n": n}]) for n in range(3)] for answer in answers]
    opener = StreamOpener(client_keys, keys.verify)
    opener.open(records[0][0])
    with pytest.raises(E2eDecryptError, match="record 1 does not decrypt"):
        opener.open(records[1][1])


def _salt_stripped(events: Events) -> Events:
    return [{k: v for k, v in events[0].items() if k != "salt"}, *events[1:]]


def _salt_swapped(events: Events) -> Events:
    return [events[0] | {"salt": b64url(bytes(32))}, *events[1:]]


def _second_salt(events: Events) -> Events:
    return [events[0], events[1] | {"salt": events[0]["salt"]}, *events[2:]]


@pytest.mark.parametrize(
    ("tamper", "refusal"),
    [
        pytest.param(_salt_stripped, "record 0 carries no salt", id="salt stripped"),
        pytest.param(_salt_swapped, "record 0 does not decrypt", id="salt swapped"),
        pytest.param(_second_salt, "record 1 carries a second salt", id="second salt"),
    ],
)
def test_a_stream_with_a_tampered_salt_is_refused_before_any_chunk_is_shown(
    make_app: Callable[..., Flask],
    platform: SimulatedTdxPlatform,
    tamper: Callable[[Events], Events],
    refusal: str,
) -> None:
    transport = RecordingTransport(make_app().test_client())
    transport.tamper_records = tamper
    shown: list[dict[str, Any]] = []
    with pytest.raises(E2eError, match=refusal):
        shown.extend(_client(transport, platform).chat_stream(MESSAGES, max_tokens=4, model=MODEL))
    assert shown == [] or tamper is _second_salt  # record 0 was genuine there


def test_a_whole_answer_with_a_swapped_salt_is_refused(
    make_app: Callable[..., Flask], platform: SimulatedTdxPlatform
) -> None:
    transport = RecordingTransport(make_app().test_client())
    transport.tamper_answer = lambda doc: doc | {"salt": b64url(bytes(32))}
    with pytest.raises(E2eError, match="signature does not verify"):  # the salt is signed
        _ask(_client(transport, platform), stream=False)


# 2. the API key ------------------------------------------------------------------------------


def test_the_outer_authorization_header_is_not_copied_into_the_sealed_request(
    make_app: Callable[..., Flask], platform: SimulatedTdxPlatform
) -> None:
    transport = RecordingTransport(make_app(api_keys=(API_KEY,)).test_client())
    transport.headers = {"Authorization": f"Bearer {API_KEY}"}  # in clear, outside the envelope
    with pytest.raises(E2eError, match="answered 401"):  # sealed back: the key inside is missing
        _ask(_client(transport, platform), stream=False)


@pytest.mark.parametrize("stream", [False, True], ids=["whole answer", "stream"])
def test_the_api_key_inside_the_envelope_is_the_one_that_authenticates(
    make_app: Callable[..., Flask], platform: SimulatedTdxPlatform, stream: bool
) -> None:
    # auth.py's gate still wants some key on every /v1/ path: it gets another valid one here,
    # so only the sealed key can decide whether the sealed request is served
    transport = RecordingTransport(make_app(api_keys=(OUTER_KEY, API_KEY)).test_client())
    transport.headers = {"Authorization": f"Bearer {OUTER_KEY}"}
    assert _ask(_client(transport, platform, api_key=API_KEY), stream)
    assert not any(API_KEY.encode() in chunk for chunk in transport.wire)
    with pytest.raises(E2eError, match="answered 401"):
        _ask(_client(transport, platform, api_key="wrong-" + API_KEY), stream)


def test_an_e2e_client_sends_no_key_in_clear_even_when_keys_are_configured(
    make_app: Callable[..., Flask], platform: SimulatedTdxPlatform
) -> None:
    transport = RecordingTransport(make_app(api_keys=(API_KEY,)).test_client())
    assert _ask(_client(transport, platform, api_key=API_KEY), stream=False)


def test_the_tapped_wire_never_carries_the_api_key(
    runner: EngineRunner, platform: SimulatedTdxPlatform
) -> None:
    deps = BootDeps(
        quote_provider=SimulatedProvider(platform),
        collateral=lambda _quote: platform.collateral_json(),
    )
    app = create_app(
        api_settings(attestation="simulated", allow_simulated=True),
        boot_deps=deps,
        engine_runner=runner,
    )
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with TcpRecorder(server.server_port) as tap:
            transport = RequestsTransport(f"http://127.0.0.1:{tap.port}", timeout_s=60)
            client = _client(transport, platform, api_key=API_KEY)
            _ask(client, stream=False)
            _ask(client, stream=True)
    finally:
        server.shutdown()
    assert b"/v1/e2e/chat/completions" in tap.captured
    assert API_KEY.encode() not in tap.captured and b"Authorization" not in tap.captured


# 3. request sizes ----------------------------------------------------------------------------


def _request_size(keys: _Keys, content: str) -> int:
    request = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    envelope, _ = seal_request(keys.public, request)
    return len(from_b64url(envelope["ciphertext"]))


def test_prompts_of_different_lengths_in_one_bucket_give_equal_ciphertext_sizes() -> None:
    keys = _Keys()
    assert _request_size(keys, "hi") == _request_size(keys, "h" * 600) == 1024 + 16
    assert _request_size(keys, "h" * 1500) == _request_size(keys, "h" * 1900) == 2048 + 16


# 4. records on a cadence ---------------------------------------------------------------------


def test_stream_records_leave_on_the_cadence_not_per_token(
    make_app: Callable[..., Flask], platform: SimulatedTdxPlatform
) -> None:
    transport = RecordingTransport(make_app(e2e_record_interval_ms=200).test_client())
    started = time.monotonic()
    chunks = _ask(_client(transport, platform), stream=True, max_tokens=48)
    elapsed = time.monotonic() - started
    (records,) = transport.streams
    assert len(chunks) >= 40  # role, ~48 tokens, finish
    ticks = elapsed / 0.2
    assert len(records) - 1 <= ticks + 1  # at most one record per tick
    if ticks < len(chunks) / 2:  # tokens came faster than the cadence (not on a loaded host,
        assert len(records) - 1 < len(chunks)  # where ticks pass between tokens): they share
    sizes = {len(from_b64url(r["ciphertext"])) - 16 for r in records}
    assert all(size >= 1024 and size & (size - 1) == 0 for size in sizes), sizes


@pytest.mark.parametrize("interval_ms", [0, 200], ids=["per chunk", "on the cadence"])
def test_a_client_that_leaves_mid_stream_cancels_its_sequence_in_the_engine(
    make_app: Callable[..., Flask], runner: EngineRunner, interval_ms: int
) -> None:
    app = make_app(e2e_record_interval_ms=interval_ms)
    hpke = app.extensions["tdllm"].identity.private_key
    public = hpke.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    request = {"model": MODEL, "messages": MESSAGES, "max_tokens": 100, "stream": True}
    envelope, _ = seal_request(public, request)
    cancelled = runner.stats.cancelled
    resp = app.test_client().post(PATH, json=envelope, buffered=False)
    records = iter(resp.response)
    for _ in range(3):  # a few records arrive (tokens are flowing), then the client goes away
        next(records)
    resp.close()
    for _ in range(200):
        if runner.stats.cancelled > cancelled and runner.outstanding == 0:
            break
        time.sleep(0.05)
    assert runner.stats.cancelled == cancelled + 1
    assert runner.outstanding == 0


# 5. profiles that show prompts to the device ---------------------------------------------------


@pytest.mark.parametrize("profile", ["split", "obfuscated"])
def test_e2e_is_refused_under_profiles_that_show_prompts_to_the_device(
    make_app: Callable[..., Flask], profile: str
) -> None:
    resp = make_app(profile=profile).test_client().post(PATH, json={"enc": "", "ciphertext": ""})
    error = assert_openai_error(resp, 403)
    assert error["code"] == "e2e_unavailable" and profile in error["message"]


@pytest.mark.parametrize("profile", ["td-only", "masked"])
def test_e2e_stays_open_under_profiles_that_keep_prompts_in_the_td(
    make_app: Callable[..., Flask], profile: str
) -> None:
    resp = make_app(profile=profile).test_client().post(PATH, json={"enc": "", "ciphertext": ""})
    assert assert_openai_error(resp, 400)["code"] == "e2e_decrypt_failed"


class _FinalStatus:
    """Stands in for the sealer to read which status the final record would carry."""

    def __init__(self) -> None:
        self.status = 0

    def record(self, chunks: list[Any]) -> dict[str, Any]:
        return {"chunks": len(chunks)}

    def final(self, status: int, body: Any) -> dict[str, Any]:
        self.status = status
        return {"final": True}


@pytest.mark.parametrize(
    ("events", "status"),
    [
        (['data: {"choices": []}\n\n', "data: [DONE]\n\n"], 200),
        (['data: {"choices": []}\n\n'], 502),  # cut: no [DONE]
        # a drain deadline: an in-band error event, then [DONE]; still not a complete answer
        (
            [
                'data: {"choices": []}\n\n',
                'data: {"error": {"message": "x"}}\n\n',
                "data: [DONE]\n\n",
            ],
            502,
        ),
    ],
)
def test_the_final_record_calls_an_answer_complete_only_without_an_error_and_with_done(
    events: list[str], status: int
) -> None:
    from flask import Response

    from tdllm.api.e2e import _sealed_stream

    sealer = _FinalStatus()
    list(_sealed_stream(Response(iter(events)), sealer, 0))  # type: ignore[arg-type]
    assert sealer.status == status
