"""Receipts from a real in-process service on a simulated TD, checked offline: by the SDK, by
`tdllm-verify receipt`, from what the official `openai` client hands its user, and inside the
end-to-end mode's sealed answers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx2
import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from openai import OpenAI
from werkzeug.serving import make_server

from tdllm.api.app import create_app
from tdllm.api.boot import BootDeps
from tdllm.api.runner import EngineRunner
from tdllm_attest import errors
from tdllm_attest.cli import verify_group
from tdllm_attest.client import E2eClient, anchor_for
from tdllm_attest.client.chat_cli import chat
from tdllm_attest.client.receipt import VerifiedReceipt, load_kept, verify_receipt
from tdllm_attest.client.receipt_protocol import RECEIPT_FIELD, RECEIPTS_NONCE, receipt_of
from tdllm_attest.testing.platform import SimulatedTdxPlatform
from tdllm_attest.testing.provider import SimulatedProvider
from tests.api.conftest import MODEL, api_settings
from tests.api.e2e_transport import RecordingTransport
from tests.client.reference_policy import policy_for, write_signed_policy

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
SIMULATED = {"TDLLM_ALLOW_SIMULATED_TDX": "1"}
API_KEY = "receipts-key-0123456789"


@dataclass
class Clock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now


@dataclass
class CountingProvider(SimulatedProvider):
    quotes: int = 0

    def get_quote(self, report_data: bytes) -> bytes:
        self.quotes += 1
        return super().get_quote(report_data)


@dataclass
class Td:
    """One service on a simulated TD, its clock, and what it serves as collateral."""

    app: Flask
    client: FlaskClient
    provider: CountingProvider
    clock: Clock
    tcb_status: list[str]


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(datetime.now(UTC))


@pytest.fixture
def make_td(runner: EngineRunner, platform: SimulatedTdxPlatform) -> Callable[..., Td]:
    def make(*, collateral: bool = True, **settings: Any) -> Td:
        provider = CountingProvider(platform)
        status = ["UpToDate"]
        served = (
            (lambda _quote: platform.collateral_json(tcb_status=status[0])) if collateral else None
        )
        deps = BootDeps(quote_provider=provider, collateral=served)
        clock = Clock(datetime.now(UTC))
        config = api_settings(
            attestation="simulated", allow_simulated=True, e2e_record_interval_ms=0, **settings
        )
        app = create_app(config, engine_runner=runner, boot_deps=deps, clock=clock)
        return Td(app, app.test_client(), provider, clock, status)

    return make


def _post(client: FlaskClient, path: str, body: dict[str, Any]) -> tuple[bytes, Any]:
    """(the exact request bytes, the response)."""
    raw = json.dumps(body).encode()
    return raw, client.post(path, data=raw, content_type="application/json")


def _chat(**options: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Name a colour."}]
    return {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0} | options


def _verify(td: Td, platform: SimulatedTdxPlatform, receipt: Any, **kw: Any) -> VerifiedReceipt:
    document = td.client.get("/v1/attestation/receipts").get_json()
    return verify_receipt(
        receipt,
        document,
        anchor=anchor_for(platform.root_der, SIMULATED),
        now=datetime.now(UTC),
        policy=policy_for(platform),
        **kw,
    )


def test_a_whole_answer_carries_a_receipt_that_verifies_offline(
    make_td: Callable[..., Td], platform: SimulatedTdxPlatform
) -> None:
    td = make_td()
    td.clock.now = start = datetime.now(UTC).replace(microsecond=123456)
    raw, resp = _post(td.client, "/v1/chat/completions", _chat(seed=7))
    body = resp.get_json()
    assert list(body)[-1] == RECEIPT_FIELD  # after OpenAI's fields, which stay as they were
    verified = _verify(td, platform, body[RECEIPT_FIELD], request_bytes=raw, response=body)
    receipt = verified.receipt
    assert receipt["time"] == start.strftime("%Y-%m-%dT%H:%M:%S.123456Z")  # the service clock
    assert receipt["endpoint"] == "/v1/chat/completions" and receipt["stream"] is False
    assert receipt["sampling"] == {
        "max_tokens": 4,
        "n": 1,
        "seed": 7,
        "stop": [],
        "temperature": "0.0",
        "top_k": 0,
        "top_p": "1.0",
    }
    assert receipt["model"] == {"id": MODEL, "sealed": None}
    assert receipt["attestation"]["tcb_status"] == "UpToDate"


def test_the_receipt_states_the_defaults_the_engine_actually_used(
    make_td: Callable[..., Td], platform: SimulatedTdxPlatform
) -> None:
    td = make_td()
    prompt = {"model": MODEL, "prompt": "Hello", "stop": "\n"}
    raw, resp = _post(td.client, "/v1/completions", prompt)
    body = resp.get_json()
    verified = _verify(td, platform, body[RECEIPT_FIELD], request_bytes=raw, response=body)
    sampling = verified.receipt["sampling"]
    assert sampling["max_tokens"] == 16 and sampling["temperature"] == "1.0"  # resolved defaults
    assert sampling["stop"] == ["\n"] and verified.receipt["endpoint"] == "/v1/completions"


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_stream_carries_its_receipt_in_the_last_event_before_done(
    make_td: Callable[..., Td], platform: SimulatedTdxPlatform, include_usage: bool
) -> None:
    td = make_td()
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    raw, resp = _post(td.client, "/v1/chat/completions", _chat(stream=True, **options))
    assert resp.data.endswith(b"data: [DONE]\n\n")
    payloads = load_kept(resp.data)  # the stream as a client kept it, data: lines and all
    carrying = [i for i, p in enumerate(payloads) if RECEIPT_FIELD in p]
    assert carrying == [len(payloads) - 1]
    last = payloads[-1]
    if include_usage:  # the usage chunk: it stays last, as OpenAI clients expect
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4
    else:  # the chunk with the finish reason: no extra chunk for clients to stumble on
        assert last["choices"][0]["finish_reason"] in ("stop", "length")
    verified = _verify(td, platform, receipt_of(payloads), request_bytes=raw, response=payloads)
    assert verified.receipt["stream"] is True
    payloads[1]["choices"][0]["delta"]["content"] = "tampered"
    with pytest.raises(errors.AttestationError, match="not the answer given"):
        _verify(td, platform, receipt_of(payloads), response=payloads)


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_answer_carries_a_receipt_over_its_calls(
    make_td: Callable[..., Td], platform: SimulatedTdxPlatform, stream: bool
) -> None:
    td = make_td(max_prompt_tokens=448)
    choice = {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"]}
    tool = {"type": "function", "function": {"name": "pick", "parameters": choice}}
    named = {"type": "function", "function": {"name": "pick"}}
    body = _chat(tools=[tool], tool_choice=named, max_tokens=48, stream=stream)
    raw, resp = _post(td.client, "/v1/chat/completions", body)
    answer = load_kept(resp.data) if stream else resp.get_json()
    receipt = receipt_of(answer) if stream else answer[RECEIPT_FIELD]
    verified = _verify(td, platform, receipt, request_bytes=raw, response=answer)
    assert verified.receipt["stream"] is stream
    last = answer[-1]["choices"][0] if stream else answer["choices"][0]
    assert last["finish_reason"] == "tool_calls"
    calls = last["delta" if stream else "message"]["tool_calls"]
    assert calls[0]["function"]["name"] == "pick"
    calls[0]["function"]["arguments"] = "3"
    with pytest.raises(errors.AttestationError, match="not the answer given"):
        _verify(td, platform, receipt, response=answer)


def test_errors_carry_no_receipt(make_td: Callable[..., Td]) -> None:
    td = make_td()
    for body in (_chat(max_tokens=0), _chat(model="nope"), {"model": MODEL}):
        _, resp = _post(td.client, "/v1/chat/completions", body)
        assert resp.status_code in (400, 404) and RECEIPT_FIELD not in resp.get_json()


def test_without_attestation_there_are_no_receipts(client: FlaskClient) -> None:
    _, resp = _post(client, "/v1/chat/completions", _chat())
    assert resp.status_code == 200 and RECEIPT_FIELD not in resp.get_json()
    resp = client.get("/v1/attestation/receipts")
    assert resp.status_code == 503
    assert resp.get_json()["error"]["code"] == "attestation_unavailable"


def test_one_quote_serves_every_receipt_until_the_claims_change(
    make_td: Callable[..., Td], platform: SimulatedTdxPlatform
) -> None:
    td = make_td()
    first = [_post(td.client, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1})]
    first.append(
        _post(td.client, "/v1/completions", {"model": MODEL, "prompt": "Ho", "max_tokens": 1})
    )
    quotes = {
        r.get_json()[RECEIPT_FIELD]["receipt"]["attestation"]["quote_sha256"] for _, r in first
    }
    document = td.client.get("/v1/attestation/receipts").get_json()
    assert td.provider.quotes == 1 and quotes == {document["quote_sha256"]}
    assert document["nonce"] == RECEIPTS_NONCE
    sealed = {"format": "tdllm-sealed/1", "manifest_sha256": "ab" * 32, "model_id": "cd" * 16}
    td.app.extensions["tdllm"].state.sealed_model = sealed  # what the service claims changed
    _, resp = _post(td.client, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    receipt = resp.get_json()[RECEIPT_FIELD]
    assert td.provider.quotes == 2 and receipt["receipt"]["model"]["sealed"] == sealed
    _verify(td, platform, receipt)


def test_the_tcb_status_is_the_tds_own_check_and_never_a_guess(
    make_td: Callable[..., Td], platform: SimulatedTdxPlatform
) -> None:
    td = make_td()
    td.tcb_status[0] = "OutOfDate"
    _, resp = _post(td.client, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    assert resp.get_json()[RECEIPT_FIELD]["receipt"]["attestation"]["tcb_status"] == "OutOfDate"
    td.tcb_status[0] = "UpToDate"  # a TCB recovery: the TD re-checks within the hour
    td.clock.now += timedelta(hours=2)
    _, resp = _post(td.client, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    stale = resp.get_json()[RECEIPT_FIELD]["receipt"]["attestation"]["tcb_status"]
    assert stale == "OutOfDate"  # this request did not wait: the re-check runs on its own thread
    deadline = time.monotonic() + 10
    while td.client.get("/v1/attestation/receipts").get_json()["tcb_status"] != "UpToDate":
        assert time.monotonic() < deadline, "the TCB re-check never landed"
        time.sleep(0.05)
    _, resp = _post(td.client, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    receipt = resp.get_json()[RECEIPT_FIELD]
    assert receipt["receipt"]["attestation"]["tcb_status"] == "UpToDate"
    assert td.provider.quotes == 1  # the same quote, checked again
    blind = make_td(collateral=False)
    _, resp = _post(
        blind.client, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    )
    assert resp.get_json()[RECEIPT_FIELD]["receipt"]["attestation"]["tcb_status"] == "unverified"
    assert blind.client.get("/v1/attestation/receipts").get_json()["collateral"] is None


def test_the_receipt_attestation_needs_no_key_in_clear(make_td: Callable[..., Td]) -> None:
    td = make_td(api_keys=(API_KEY,))
    assert td.client.get("/v1/attestation/receipts").status_code == 200
    _, resp = _post(td.client, "/v1/completions", {"model": MODEL, "prompt": "Hi"})
    assert resp.status_code == 401


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def test_tdllm_verify_receipt_checks_a_receipt_of_the_service_offline(
    make_td: Callable[..., Td],
    platform: SimulatedTdxPlatform,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    td = make_td()
    raw, resp = _post(td.client, "/v1/chat/completions", _chat(stream=True))
    stream = _write(tmp_path, "stream.txt", resp.data)  # as `curl -N` keeps it
    request = _write(tmp_path, "request.json", raw)
    document = _write(tmp_path, "receipts.json", td.client.get("/v1/attestation/receipts").data)
    root = _write(tmp_path, "root.der", platform.root_der)
    policy, key = write_signed_policy(tmp_path, platform)
    monkeypatch.setenv("TDLLM_ALLOW_SIMULATED_TDX", "1")
    args = ["receipt", stream, "--attestation", document, "--simulated-root", root]
    args += ["--policy", policy, "--policy-key", key, "--request", request, "--response", stream]
    ok = CliRunner().invoke(verify_group(), [str(a) for a in args])
    assert ok.exit_code == 0, ok.output
    for check in (
        "attestation verified (reference values 'simulated-test-td')",
        "receipt signed by the attested signing key",
        "request digest",
        "response digest",
    ):
        assert f"[PASS] {check}" in ok.output
    assert "RESULT: PASS" in ok.output and "SIMULATED" in ok.output
    altered = _write(tmp_path, "altered.txt", resp.data.replace(b'"content":"', b'"content":"X', 2))
    args[args.index(stream, 2)] = altered
    bad = CliRunner().invoke(verify_group(), [str(a) for a in args])
    assert bad.exit_code == errors.EXIT_BINDING, bad.output
    assert "[FAIL] response digest: receipt refused:" in bad.output
    as_json = CliRunner().invoke(verify_group(), [str(a) for a in args] + ["--json"])
    assert json.loads(as_json.output)["exit_code"] == errors.EXIT_BINDING


def _openai(td: Td) -> OpenAI:
    http = httpx2.Client(transport=httpx2.WSGITransport(app=td.app), base_url="http://td")
    return OpenAI(base_url="http://td/v1", api_key="unused", http_client=http, max_retries=0)


def test_the_official_openai_client_keeps_what_its_receipts_need(
    make_td: Callable[..., Td], platform: SimulatedTdxPlatform
) -> None:
    """Its objects ignore nothing: `to_dict()` gives back the body and chunks the receipt
    digests, receipt included, and streams behave as without receipts."""
    td = make_td()
    client = _openai(td)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    completion = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=6,
        temperature=0,  # type: ignore[arg-type]
    )
    assert completion.choices[0].message.content
    body = completion.to_dict()
    _verify(td, platform, receipt_of(body), response=body)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    payloads = [c.to_dict() for c in chunks]
    verified = _verify(td, platform, receipt_of(payloads), response=payloads)
    assert verified.receipt["stream"] is True
    with client.chat.completions.stream(
        model=MODEL,
        messages=messages,
        max_tokens=6,
        temperature=0,  # type: ignore[arg-type]
    ) as helper:
        for _event in helper:  # the accumulating helper: a later chunk may not undo the finish
            pass
        final = helper.current_completion_snapshot
    assert final.choices[0].finish_reason == "length" and final.choices[0].message.content


def test_end_to_end_answers_carry_receipts_over_the_request_the_client_sealed(
    make_td: Callable[..., Td], platform: SimulatedTdxPlatform
) -> None:
    td = make_td()
    anchor = anchor_for(platform.root_der, SIMULATED)
    client = E2eClient(RecordingTransport(td.client), anchor, policy=policy_for(platform))
    messages = [{"role": "user", "content": "Name a colour."}]
    body = client.chat(messages, max_tokens=4, temperature=0)
    assert client.last_request is not None
    verify = {"anchor": anchor, "now": datetime.now(UTC), "policy": policy_for(platform)}
    document = client.receipt_attestation()
    request = client.last_request
    verify_receipt(receipt_of(body), document, request_bytes=request, response=body, **verify)
    chunks = list(client.chat_stream(messages, max_tokens=4, temperature=0))
    request = client.last_request
    verify_receipt(receipt_of(chunks), document, request_bytes=request, response=chunks, **verify)


@pytest.fixture
def served(make_td: Callable[..., Td]) -> Iterator[str]:
    """A service on a loopback port, for the command-line client."""
    server = make_server("127.0.0.1", 0, make_td().app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


@pytest.mark.parametrize("mode", ["--stream", "--no-stream"])
def test_tdllm_chat_saves_what_tdllm_verify_receipt_needs(
    served: str, platform: SimulatedTdxPlatform, tmp_path: Path, mode: str
) -> None:
    root = _write(tmp_path, "root.der", platform.root_der)
    policy, key = write_signed_policy(tmp_path, platform)
    trust = ["--simulated-root", root, "--policy", policy, "--policy-key", key]
    saved = tmp_path / "receipt"
    args = ["--e2e", served, *trust, "--max-tokens", "4", mode, "--save-receipt", saved, "Hi"]
    env = {"TDLLM_ALLOW_SIMULATED_TDX": "1"}
    answered = CliRunner().invoke(chat, [str(a) for a in args], env=env)
    assert answered.exit_code == 0, answered.output
    files = {name: saved / f"{name}.json" for name in ("receipt", "attestation", "request")}
    check = ["receipt", files["receipt"], "--attestation", files["attestation"], *trust]
    check += ["--request", files["request"], "--response", saved / "response.json"]
    verified = CliRunner().invoke(verify_group(), [str(a) for a in check], env=env)
    assert verified.exit_code == 0, verified.output
    assert "Request: matches" in verified.output and "Response: matches" in verified.output
