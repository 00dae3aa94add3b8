"""The OpenAI routes on the `vllm` engine: check, forward over vLLM's socket, relay the answer.

The front stays in charge of what reaches vLLM: the body must be a JSON object whose every
field is on the endpoint's allow-list (OpenAI's parameters vLLM implements, plus a few of
vLLM's sampling extras); fields that change the server's behaviour (a client-supplied chat
template runs Jinja in the TD, KV-transfer parameters name other endpoints, ...) are refused
with a 400 naming them. The model must be the served one, `max_tokens` stays within this
service's limit (and is always sent, so the receipt states what ran; chat's
`max_completion_tokens` and `max_tokens` may not differ), and the choices within the limits the
tdllm engine applies (`check_choices`: `n` at most `max_n` and `max_batch`, prompts times `n` at
most `max_n`). vLLM gets the parsed object re-encoded, never the raw bytes: what was checked is
what it parses (duplicate keys, odd encodings). Types and ranges are vLLM's to check; its 4xx
answers come back as ours, in OpenAI's error shape, and its 5xx as a 502.

Answers are relayed as vLLM wrote them, with the receipt attached exactly as on our engine:
a whole body's ``tdllm_receipt`` field, or the last event before ``[DONE]``. A client that
goes away mid-stream closes the generator, which closes the socket: vLLM aborts the request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from http.client import HTTPResponse
from typing import Any, TypeGuard

from flask import Response, current_app, g, jsonify, request, stream_with_context

from tdllm.api.errors import ApiError, invalid, not_ready, queue_full
from tdllm.api.openai import sse
from tdllm.api.openai.logprobs import check_logprobs
from tdllm.api.openai.protocol import decode_body
from tdllm.api.receipts import pending_receipt
from tdllm.api.shutdown import draining, shutting_down
from tdllm.settings import logprobs_limit
from tdllm.vllm_engine.backend import InFlight, Refused, VllmBackend
from tdllm_attest.client.receipt_protocol import RECEIPT_FIELD, StreamDigest, body_sha256, decimal

SHARED_FIELDS = frozenset(
    {
        "model", "stream", "stream_options", "max_tokens", "n", "seed", "stop", "temperature",
        "top_p", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user",
        "response_format",
        # vLLM's sampling extras
        "top_k", "min_p", "repetition_penalty", "min_tokens",
    }
)  # fmt: skip
CHAT_FIELDS = SHARED_FIELDS | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
}
COMPLETION_FIELDS = SHARED_FIELDS | {"prompt", "echo"}
# vLLM's /tokenize, less what runs client input as code or reads files (chat_template,
# chat_template_kwargs, media_io_kwargs, mm_processor_kwargs); tools as chat takes them, so a
# conversation with tools counts as chat would render it
TOKENIZE_FIELDS = frozenset(
    {
        "model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
        "continue_final_message", "return_token_strs", "tools",
    }
)  # fmt: skip
_DATA = b"data: "


def running_vllm() -> VllmBackend:
    service = current_app.extensions["tdllm"]
    if draining(service):
        raise shutting_down("the service is shutting down and takes no new requests")
    if not service.state.ready:
        raise not_ready(service.state.not_ready_reason())
    backend = service.state.runner
    if not isinstance(backend, VllmBackend):
        raise not_ready("the vLLM engine is not running")
    return backend


def relay(path: str, raw: bytes, fields: frozenset[str], default_max_tokens: int) -> Response:
    """Serve `path` (a POST of `raw`) through vLLM."""
    doc = decode_body(raw)
    unknown = sorted(set(doc) - fields)
    if unknown:
        raise invalid(f"unrecognized request argument: {unknown[0]}", unknown[0])
    backend = running_vllm()
    if doc.get("model") != backend.model_name:
        raise ApiError(
            404,
            f"the model {doc.get('model')!r} does not exist; this service serves "
            f"{backend.model_name!r}",
            "invalid_request_error",
            "model",
            "model_not_found",
        )
    doc = salted(_limited(doc, default_max_tokens))
    stream = doc.get("stream") is True
    receipt = pending_receipt(request.path, raw, sampling_stated(doc), stream)
    service = current_app.extensions["tdllm"]
    timeout = service.settings.request_timeout_s
    started = g.started
    flight = _begin(backend, timeout)
    try:
        flight.connection.request(
            "POST", path, body=json.dumps(doc), headers={"Content-Type": "application/json"}
        )
        answer = flight.connection.getresponse()
        if answer.status != 200:
            raise _vllm_error(answer.status, answer.read())
    except OSError as exc:
        flight.end()
        raise not_ready(f"the vLLM engine did not answer ({type(exc).__name__})") from None
    except ApiError:
        flight.end()
        raise
    g.log_fields = {"max_tokens": max_tokens_of(doc)}
    if not stream:
        try:
            body = json.loads(answer.read())
        except (OSError, ValueError) as exc:
            raise not_ready(f"the vLLM engine's answer broke off ({type(exc).__name__})") from None
        finally:
            flight.end()
        service.metrics.ttft.observe(time.monotonic() - started)
        _count_usage(body)
        if receipt is not None:
            body = body | {RECEIPT_FIELD: receipt.sign(body_sha256(body))}
        return jsonify(body)

    def events() -> Iterator[str]:
        digest = StreamDigest()
        held: dict[str, Any] | None = None  # one event back: the last one gets the receipt
        first = True
        try:
            for payload in _sse_payloads(answer):
                if first:
                    service.metrics.ttft.observe(time.monotonic() - started)
                    first = False
                if payload is None:  # [DONE]
                    if held is not None:
                        digest.add(held)
                        if receipt is not None:
                            held = held | {RECEIPT_FIELD: receipt.sign(digest.hexdigest())}
                        yield sse.event(held)
                    yield sse.DONE
                    return
                if held is not None:
                    digest.add(held)
                    yield sse.event(held)
                held = payload
                _count_usage(payload)
            # no [DONE]: vLLM went away mid-stream; end in-band, as OpenAI reports errors
            yield sse.event(not_ready("the vLLM engine stopped mid-stream").body())
        except (OSError, ValueError):
            yield sse.event(not_ready("the vLLM engine's stream broke off").body())
        finally:
            flight.end()

    response = Response(stream_with_context(events()), mimetype=sse.MIMETYPE, headers=sse.HEADERS)
    response.call_on_close(flight.end)  # also when the stream never started
    return response


def exchange(backend: VllmBackend, path: str, doc: dict[str, Any]) -> Any:
    """POST `doc` to vLLM's `path` and return its whole JSON answer (no stream, no receipt:
    /tokenize and /detokenize); vLLM's 4xx as ours, its 5xx a 502, no answer a 503."""
    timeout = current_app.extensions["tdllm"].settings.request_timeout_s
    flight = _begin(backend, timeout)
    try:
        flight.connection.request(
            "POST", path, body=json.dumps(doc), headers={"Content-Type": "application/json"}
        )
        answer = flight.connection.getresponse()
        raw = answer.read()
        if answer.status != 200:
            raise _vllm_error(answer.status, raw)
        return json.loads(raw)
    except (OSError, ValueError) as exc:
        raise not_ready(f"the vLLM engine did not answer ({type(exc).__name__})") from None
    finally:
        flight.end()


def _begin(backend: VllmBackend, timeout: float) -> InFlight:
    """A connection to vLLM for one request, or the error of a backend that takes none."""
    try:
        return backend.begin(timeout)
    except Refused as exc:
        if exc.why == "overloaded":
            raise queue_full() from None
        if exc.why == "draining":
            raise shutting_down(str(exc)) from None
        raise not_ready(str(exc)) from None


def _limited(doc: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """`doc` with max_tokens resolved and within this service's limits (400 if not)."""
    settings = current_app.extensions["tdllm"].settings
    key = "max_completion_tokens" if "max_completion_tokens" in doc else "max_tokens"
    max_tokens = doc.get(key, default_max_tokens)
    check_max_tokens(doc | {key: max_tokens}, settings.max_tokens_limit)
    check_choices(doc, settings.max_n, settings.max_batch)
    check_logprobs(doc, logprobs_limit(settings.logprobs_policy))
    return doc | {key: max_tokens}


def salted(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with vLLM's `cache_salt` set to the request's API-key scope (auth.cache_scope), so
    vLLM's prefix cache is kept per key as ours is; unchanged without keys."""
    scope = g.get("cache_scope")
    return doc | {"cache_salt": scope.hex()} if scope else doc


def check_max_tokens(doc: dict[str, Any], limit: int) -> None:
    """The tdllm engine's rules, where `doc` states integers (the rest is vLLM's to check):
    chat's `max_completion_tokens` and `max_tokens` not different, neither over `limit`."""
    given = doc.get("max_completion_tokens")
    other = doc.get("max_tokens")
    if _is_int(given) and _is_int(other) and given != other:
        raise invalid(
            f"max_tokens ({other}) and max_completion_tokens ({given}) differ: give one of "
            "them (or the same value)",
            "max_completion_tokens",
        )
    for key in ("max_completion_tokens", "max_tokens"):
        value = doc.get(key)
        if _is_int(value) and value > limit:
            raise invalid(f"{key} is {value}; the limit is {limit}", key)


def check_choices(doc: dict[str, Any], max_n: int, max_batch: int) -> None:
    """The tdllm engine's limits on choices, where `doc` states them in types it could run (the
    rest is vLLM's to check): `n` at most `max_n` and `max_batch`, and a list prompt's prompts
    times `n` at most `max_n`."""
    asked = doc.get("n")
    n = asked if _is_int(asked) else 1
    if n > max_n:
        raise invalid(f"n is {n}; this service allows at most {max_n} (max_n)", "n")
    if n > max_batch:
        raise invalid(
            f"n is {n}; the choices of a prompt decode together and this service decodes at "
            f"most {max_batch} sequences at once (max_batch)",
            "n",
        )
    prompt = doc.get("prompt")
    prompts = 1
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        prompts = len(prompt)
    if prompts * n > max_n:
        raise invalid(
            f"{prompts} prompts with n = {n} are {prompts * n} choices; this service allows at "
            f"most {max_n} per request (max_n)",
            "prompt",
        )


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def max_tokens_of(doc: dict[str, Any]) -> Any:
    return doc.get("max_completion_tokens", doc.get("max_tokens"))


def sampling_stated(doc: dict[str, Any]) -> dict[str, Any]:
    """The receipt's sampling: the request's values, else the defaults vLLM applies (the model
    directory carries no sampling defaults: `model_dir`). Values vLLM will refuse are stated
    as sent; no answer, so no receipt, follows them."""
    stop = doc.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, list) else []

    def number(name: str, default: float) -> Any:
        value = doc.get(name, default)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return decimal(value) if ok else value

    top_k = doc.get("top_k", 0)
    return {
        "max_tokens": max_tokens_of(doc),
        "n": doc.get("n", 1),
        "seed": doc.get("seed"),
        "stop": stops,
        "temperature": number("temperature", 1.0),
        "top_k": 0 if top_k == -1 else top_k,
        "top_p": number("top_p", 1.0),
    }


def _sse_payloads(answer: HTTPResponse) -> Iterator[dict[str, Any] | None]:
    """Each event's JSON object, then None for ``[DONE]``."""
    while True:
        line = answer.readline()
        if not line:
            return
        line = line.rstrip(b"\r\n")
        if not line.startswith(_DATA):
            continue  # the blank line between events, or an SSE comment
        data = line[len(_DATA) :]
        if data == b"[DONE]":
            yield None
            return
        payload = json.loads(data)
        if not isinstance(payload, dict):
            raise ValueError("an event that is not a JSON object")
        yield payload


def _count_usage(payload: dict[str, Any]) -> None:
    usage = payload.get("usage")
    if isinstance(usage, dict):
        service = current_app.extensions["tdllm"]
        prompt = usage.get("prompt_tokens")
        if isinstance(prompt, int):
            service.metrics.prompt_tokens.inc(prompt)
        completion = usage.get("completion_tokens")
        if isinstance(completion, int):
            g.log_fields |= {"prompt_tokens": prompt, "completion_tokens": completion}


def _vllm_error(status: int, raw: bytes) -> ApiError:
    """vLLM's error answer as ours: its 4xx (a client mistake) with vLLM's message; its 5xx as
    a 502, without vLLM's words (an internal failure is not the client's to read)."""
    if status >= 500:
        return ApiError(
            502, f"the vLLM engine failed the request (HTTP {status})", "server_error", None,
            "engine_error",
        )  # fmt: skip
    try:
        error = json.loads(raw).get("error", {})
    except (ValueError, AttributeError):
        error = {}
    message = error.get("message") if isinstance(error, dict) else None
    param = error.get("param") if isinstance(error, dict) else None
    if isinstance(param, str) and param.startswith("body."):
        param = param[len("body.") :]
    if not isinstance(message, str) or not message:
        message = f"the request was refused by the engine (HTTP {status})"
    status = 400 if status == 422 else status
    code = "context_length_exceeded" if "context length" in message else None
    return ApiError(
        status, message, "invalid_request_error", param if isinstance(param, str) else None, code
    )
