"""What completions and chat share: limits, submission to the runner, and the two response modes.

Both endpoints reduce to (prompt token ids, sampling params) plus a way to shape one chunk or one
final body; this module runs that through the `EngineRunner` either to completion or as an SSE
stream, counting usage and time-to-first-token, and signs the answer's receipt (`receipts`): a
whole body's ``tdllm_receipt`` field, or the last event of a stream. A client that disconnects
mid-stream closes the generator, which cancels its sequence in the engine at once.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from flask import Response, current_app, g, jsonify, request, stream_with_context

from tdllm.api.errors import ApiError, from_exception, invalid, not_ready, queue_full
from tdllm.api.openai import sse
from tdllm.api.openai.protocol import Sampling
from tdllm.api.receipts import PendingReceipt, pending_receipt, sampling_used
from tdllm.api.runner import (
    EngineRunner,
    Overloaded,
    RequestHandle,
    RunnerStopped,
    ShuttingDown,
)
from tdllm.api.shutdown import draining, shutting_down
from tdllm.engine import SamplingParams
from tdllm.engine.prompt_check import PromptError, check_prompt
from tdllm_attest.client.receipt_protocol import RECEIPT_FIELD, StreamDigest, body_sha256


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0

    def body(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass
class Generation:
    """One accepted request on its way through the engine."""

    id: str
    created: int
    model: str
    sampling: Sampling
    handle: RequestHandle
    usage: Usage
    started: float
    receipt: PendingReceipt | None  # None: the service runs without attestation


def running_engine() -> EngineRunner:
    service = current_app.extensions["tdllm"]
    if draining(service):
        raise shutting_down("the service is shutting down and takes no new requests")
    state = service.state
    if not state.ready:
        raise not_ready(state.not_ready_reason())
    runner = state.runner
    if not isinstance(runner, EngineRunner):  # settings.engine decides the route's path
        raise not_ready("the tdllm engine is not running")
    return runner


def check_model(runner: EngineRunner, sampling: Sampling) -> None:
    check_model_name(sampling.model, runner.model_name)


def check_model_name(model: str | None, served: str) -> None:
    """A 404 unless `model` is the served one (None: not given, where that means the served
    one: /tokenize and /detokenize, as in vLLM)."""
    if model is not None and model != served:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this service serves {served!r}",
            "invalid_request_error",
            "model",
            "model_not_found",
        )


def check_prompt_limits(runner: EngineRunner, prompt: list[int], param: str) -> None:
    """The 400 of a prompt the engine would refuse (`check_prompt`: empty, over
    `max_prompt_tokens`, no room in the context, an id outside the vocabulary); `param` names
    the prompt's field."""
    settings = current_app.extensions["tdllm"].settings
    try:
        check_prompt(
            prompt,
            vocab_size=runner.engine.model.cfg.vocab_size,
            context=runner.engine.max_seq_len,
            max_prompt_tokens=settings.max_prompt_tokens,
        )
    except PromptError as problem:
        raise _prompt_error(problem, param) from None


def start(
    runner: EngineRunner,
    prompt: list[int],
    sampling: Sampling,
    default_max: int,
    prefix: str,
    request_body: bytes,
) -> Generation:
    """Check limits, build sampling params, ready the receipt of `request_body` (the exact bytes
    received) and queue the request (429 when full)."""
    service = current_app.extensions["tdllm"]
    settings = service.settings
    context = runner.engine.max_seq_len
    check_prompt_limits(runner, prompt, "prompt" if prefix == "cmpl" else "messages")
    room = context - len(prompt)
    max_tokens = sampling.max_tokens
    if max_tokens is None:
        max_tokens = max(1, min(default_max, room))
    if max_tokens > settings.max_tokens_limit:
        raise invalid(
            f"max_tokens is {max_tokens}; the limit is {settings.max_tokens_limit}", "max_tokens"
        )
    if max_tokens > room:
        raise invalid(
            f"this model's context holds {context} tokens; the prompt has {len(prompt)} and "
            f"max_tokens asks for {max_tokens}",
            "max_tokens",
            "context_length_exceeded",
        )
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        stop=sampling.stop,
    )
    receipt = pending_receipt(request.path, request_body, sampling_used(params), sampling.stream)
    try:
        handle = runner.submit(prompt, params)
    except Overloaded:
        raise queue_full() from None
    except ShuttingDown as exc:  # the drain began after `running_engine`
        raise shutting_down(str(exc)) from None
    except RunnerStopped as exc:
        raise not_ready(str(exc)) from None
    service.metrics.prompt_tokens.inc(len(prompt))
    g.log_fields = {"prompt_tokens": len(prompt), "max_tokens": max_tokens}
    return Generation(
        f"{prefix}-{secrets.token_hex(12)}",
        int(time.time()),
        runner.model_name,
        sampling,
        handle,
        Usage(len(prompt)),
        g.started,
        receipt,
    )


def _prompt_error(problem: PromptError, param: str) -> ApiError:
    """The 400 for a prompt `check_prompt` refused; `param` names the prompt's field. Token ids
    come only from a completions prompt (chat messages are text), so they name "prompt"."""
    if problem.code == "token_out_of_range":
        return invalid(str(problem), "prompt")
    if problem.code == "context_length_exceeded":
        return invalid(str(problem), param, "context_length_exceeded")
    return invalid(str(problem), param)


def _outputs(gen: Generation) -> Iterator[tuple[str, str | None]]:
    """(text, finish_reason) per step, counting usage and recording TTFT."""
    service = current_app.extensions["tdllm"]
    first = True
    timeout = service.settings.request_timeout_s
    for out in gen.handle.outputs(timeout):
        if first:
            service.metrics.ttft.observe(time.monotonic() - gen.started)
            first = False
        gen.usage.completion_tokens += 1
        yield out.text, out.finish_reason


def complete(gen: Generation) -> tuple[str, str]:
    """Run to the end: (text, finish_reason)."""
    parts: list[str] = []
    reason = "stop"
    try:
        for text, finish in _outputs(gen):
            parts.append(text)
            reason = finish or reason
    except ShuttingDown as exc:  # still running at the drain deadline
        g.log_fields |= {
            "completion_tokens": gen.usage.completion_tokens,
            "finish_reason": "shutdown",
        }
        raise shutting_down(str(exc)) from None
    except (RunnerStopped, TimeoutError) as exc:
        raise not_ready(str(exc)) from None
    g.log_fields |= {"completion_tokens": gen.usage.completion_tokens, "finish_reason": reason}
    return "".join(parts), reason


def answer(gen: Generation, body: dict[str, Any]) -> Response:
    """The whole answer, with its receipt over `body` as a last, top-level field."""
    if gen.receipt is not None:
        body = body | {RECEIPT_FIELD: gen.receipt.sign(body_sha256(body))}
    return jsonify(body)


def stream(
    gen: Generation,
    chunk: Callable[[str | None, str | None], dict[str, Any]],
    first: dict[str, Any] | None = None,
) -> Response:
    """An SSE response: `chunk(text, finish_reason)` shapes each event's payload. The last event
    before ``[DONE]`` (the usage chunk, else the one with the finish reason) carries the receipt
    over every payload of the stream."""
    fields = g.log_fields
    digest = StreamDigest()

    def event(payload: dict[str, Any], last: bool = False) -> str:
        digest.add(payload)
        if last and gen.receipt is not None:
            payload = payload | {RECEIPT_FIELD: gen.receipt.sign(digest.hexdigest())}
        return sse.event(payload)

    def events() -> Iterator[str]:
        include_usage = gen.sampling.include_usage
        usage = {"usage": None} if include_usage else {}
        if first is not None:
            yield event(first | usage)
        try:
            for text, finish in _outputs(gen):
                if text or finish:
                    last = bool(finish) and not include_usage
                    yield event(chunk(text, finish) | usage, last)
                if finish:
                    fields.update(
                        completion_tokens=gen.usage.completion_tokens, finish_reason=finish
                    )
        except ShuttingDown as exc:  # the drain deadline: a final error event, a proper end
            fields.update(completion_tokens=gen.usage.completion_tokens, finish_reason="shutdown")
            yield sse.event(shutting_down(str(exc)).body())
            yield sse.DONE
            return
        except Exception as exc:  # headers are gone: report in-band, the way OpenAI does
            yield sse.event(from_exception(_as_api_error(exc)).body())
            return
        if include_usage:
            tail = {
                "id": gen.id,
                "object": chunk(None, None)["object"],
                "created": gen.created,
                "model": gen.model,
                "choices": [],
                "usage": gen.usage.body(),
            }
            yield event(tail, last=True)
        yield sse.DONE

    # keeps the request context (and `g`) alive while the body streams
    return Response(stream_with_context(events()), mimetype=sse.MIMETYPE, headers=sse.HEADERS)


def _as_api_error(exc: Exception) -> Exception:
    if isinstance(exc, RunnerStopped | TimeoutError):
        return not_ready(str(exc))
    return exc
