"""What completions and chat share: limits, submission to the runner, and the two response modes.

Both endpoints reduce to (prompts' token ids, sampling params) plus a way to shape one chunk or
one final body; this module runs that through the `EngineRunner` either to completion or as an
SSE stream, counting usage and time-to-first-token, and signs the answer's receipt (`receipts`):
a whole body's ``tdllm_receipt`` field, or the last event of a stream. A client that disconnects
mid-stream closes the generator, which cancels its sequences in the engine at once.

Choices are numbered as OpenAI and vLLM number them: choice j of prompt i (a list prompt of
/v1/completions) has index ``i * n + j``. A whole answer lists them in that order; a stream
sends each choice's text in chunks of one choice, as it comes. Usage counts each prompt once and
every choice's tokens (vLLM's `OpenAIServingCompletion`).
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
from tdllm.api.openai.logprobs import ChoiceLogprobs
from tdllm.api.openai.protocol import Sampling
from tdllm.api.receipts import PendingReceipt, pending_receipt, sampling_used
from tdllm.api.runner import (
    EngineRunner,
    Overloaded,
    RequestHandle,
    RunnerStopped,
    ShuttingDown,
    merged_outputs,
)
from tdllm.api.shutdown import draining, shutting_down
from tdllm.engine import SamplingParams
from tdllm.engine.prompt_check import PromptError, check_prompt
from tdllm.errors import UsageError
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
    handles: list[RequestHandle]  # one per prompt, in order
    usage: Usage
    started: float
    receipt: PendingReceipt | None  # None: the service runs without attestation
    logprobs: ChoiceLogprobs | None = None  # each choice's token logprobs, when asked

    @property
    def choices(self) -> int:
        return len(self.handles) * self.sampling.n


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
            max_prompt_tokens=settings.max_prompt_tokens or None,
        )
    except PromptError as problem:
        raise _prompt_error(problem, param) from None


def check_choices(runner: EngineRunner, sampling: Sampling, prompts: int) -> None:
    """The 400 of more choices than this service runs: `n` over the `max_n` setting or over
    `max_batch` (a request's choices run together, a slot each), or `prompts` times `n` over
    `max_n` or over what the runner ever admits at once."""
    settings = current_app.extensions["tdllm"].settings
    n, max_n = sampling.n, settings.max_n
    if n > max_n:
        raise invalid(f"n is {n}; this service allows at most {max_n} (max_n)", "n")
    slots = runner.engine.cache.max_batch
    if n > slots:
        raise invalid(
            f"n is {n}; the choices of a prompt decode together and this service decodes at "
            f"most {slots} sequences at once (max_batch)",
            "n",
        )
    total = prompts * n
    if total > max_n:
        raise invalid(
            f"{prompts} prompts with n = {n} are {total} choices; this service allows at most "
            f"{max_n} per request (max_n)",
            "prompt",
        )
    if total > runner.capacity:
        raise invalid(
            f"{prompts} prompts with n = {n} are {total} sequences; this service holds at most "
            f"{runner.capacity} (max_batch + queue_size)",
            "prompt",
        )


def start(
    runner: EngineRunner,
    prompts: list[list[int]],
    sampling: Sampling,
    default_max: int,
    prefix: str,
    request_body: bytes,
) -> Generation:
    """Check limits, build sampling params, ready the receipt of `request_body` (the exact bytes
    received) and queue the request: every prompt's `n` choices, or none (429 when full)."""
    service = current_app.extensions["tdllm"]
    settings = service.settings
    context = runner.engine.max_seq_len
    param = "prompt" if prefix == "cmpl" else "messages"
    for prompt in prompts:
        check_prompt_limits(runner, prompt, param)
    check_choices(runner, sampling, len(prompts))
    longest = max(len(p) for p in prompts)
    room = context - longest
    max_tokens, max_param = sampling.max_tokens, sampling.max_tokens_param
    if max_tokens is None:  # one for all prompts: what the longest leaves room for
        max_tokens = max(1, min(default_max, room))
    if max_tokens > settings.max_tokens_limit:
        raise invalid(
            f"{max_param} is {max_tokens}; the limit is {settings.max_tokens_limit}", max_param
        )
    if max_tokens > room:
        raise invalid(
            f"this model's context holds {context} tokens; the prompt has {longest} and "
            f"{max_param} asks for {max_tokens}",
            max_param,
            "context_length_exceeded",
        )
    if sampling.min_tokens > max_tokens:
        raise invalid(
            f"min_tokens is {sampling.min_tokens}; it must be at most max_tokens ({max_tokens})",
            "min_tokens",
        )
    vocab = runner.engine.model.cfg.vocab_size
    outside = sorted({t for t, _ in sampling.logit_bias if t >= vocab})
    if outside:
        raise invalid(
            f"logit_bias names token ids outside the vocabulary [0, {vocab}): {outside[:5]}",
            "logit_bias",
        )
    if sampling.grammar is not None:
        problem = runner.engine.grammars.problem(sampling.grammar)
        if problem:
            param = sampling.grammar_param
            raise invalid(f"{param} is not usable: {problem}", param)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        stop=sampling.stop,
        n=sampling.n,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repetition_penalty,
        logit_bias=sampling.logit_bias,
        min_tokens=sampling.min_tokens,
        grammar=sampling.grammar,
        logprobs=sampling.logprobs,
        cache_scope=g.get("cache_scope", b""),  # the API key's (auth.py); none without keys
    )
    try:  # n long choices may outgrow the KV budget (one always fits: kv_cache_tokens >= context)
        runner.engine.check_fits(max(prompts, key=len), params)
    except UsageError as exc:
        raise invalid(str(exc), "n") from None
    receipt = pending_receipt(request.path, request_body, sampling_used(params), sampling.stream)
    try:
        handles = runner.submit_all(prompts, params)
    except Overloaded:
        raise queue_full() from None
    except ShuttingDown as exc:  # the drain began after `running_engine`
        raise shutting_down(str(exc)) from None
    except RunnerStopped as exc:
        raise not_ready(str(exc)) from None
    prompt_tokens = sum(len(p) for p in prompts)
    service.metrics.prompt_tokens.inc(prompt_tokens)
    g.log_fields = {"prompt_tokens": prompt_tokens, "max_tokens": max_tokens}
    if len(handles) * params.n > 1:
        g.log_fields["choices"] = len(handles) * params.n
    return Generation(
        f"{prefix}-{secrets.token_hex(12)}",
        int(time.time()),
        runner.model_name,
        sampling,
        handles,
        Usage(prompt_tokens),
        g.started,
        receipt,
        None if sampling.logprobs is None else ChoiceLogprobs(len(handles) * params.n),
    )


def _prompt_error(problem: PromptError, param: str) -> ApiError:
    """The 400 for a prompt `check_prompt` refused; `param` names the prompt's field. Token ids
    come only from a completions prompt (chat messages are text), so they name "prompt"."""
    if problem.code == "token_out_of_range":
        return invalid(str(problem), "prompt")
    if problem.code == "context_length_exceeded":
        return invalid(str(problem), param, "context_length_exceeded")
    return invalid(str(problem), param)


def _outputs(gen: Generation) -> Iterator[tuple[int, str, str | None]]:
    """(choice index, text, finish_reason) per step of any choice, counting usage and
    recording TTFT."""
    service = current_app.extensions["tdllm"]
    first = True
    timeout = service.settings.request_timeout_s
    position = {id(handle): i for i, handle in enumerate(gen.handles)}
    n = gen.sampling.n
    for handle, out in merged_outputs(gen.handles, timeout):
        if first:
            service.metrics.ttft.observe(time.monotonic() - gen.started)
            first = False
        gen.usage.completion_tokens += 1
        if gen.logprobs is not None and out.logprobs is not None:
            gen.logprobs.add(position[id(handle)] * n + out.index, out.logprobs)
        yield position[id(handle)] * n + out.index, out.text, out.finish_reason


def complete(gen: Generation) -> list[tuple[str, str]]:
    """Run to the end: (text, finish_reason) of each choice, by index."""
    parts: list[list[str]] = [[] for _ in range(gen.choices)]
    reasons = ["stop"] * gen.choices
    try:
        for index, text, finish in _outputs(gen):
            parts[index].append(text)
            reasons[index] = finish or reasons[index]
    except ShuttingDown as exc:  # still running at the drain deadline
        g.log_fields |= {
            "completion_tokens": gen.usage.completion_tokens,
            "finish_reason": "shutdown",
        }
        raise shutting_down(str(exc)) from None
    except (RunnerStopped, TimeoutError) as exc:
        raise not_ready(str(exc)) from None
    # the access line: one reason, or each choice's
    reason: str | list[str] = reasons[0] if len(reasons) == 1 else reasons
    g.log_fields |= {"completion_tokens": gen.usage.completion_tokens, "finish_reason": reason}
    return [("".join(p), r) for p, r in zip(parts, reasons, strict=True)]


def answer(gen: Generation, body: dict[str, Any]) -> Response:
    """The whole answer, with its receipt over `body` as a last, top-level field."""
    if gen.receipt is not None:
        body = body | {RECEIPT_FIELD: gen.receipt.sign(body_sha256(body))}
    return jsonify(body)


def stream(
    gen: Generation,
    chunk: Callable[[int, str | None, str | None], dict[str, Any]],
    first: list[dict[str, Any]] | None = None,
) -> Response:
    """An SSE response: `chunk(index, text, finish_reason)` shapes each event's payload, one
    choice's step (an empty one sends nothing); `first` are payloads sent before any. The last
    event before ``[DONE]`` (the usage chunk, else the one with the last choice's finish reason)
    carries the receipt over every payload of the stream."""
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
        for payload in first or []:
            yield event(payload | usage)
        reasons: dict[int, str] = {}  # by choice index, once finished
        try:
            for index, text, finish in _outputs(gen):
                if finish:
                    reasons[index] = finish
                done = len(reasons) == gen.choices
                step = chunk(index, text, finish) if text or finish else {}
                if step:  # empty: nothing to send for this step (text held back)
                    yield event(step | usage, done and not include_usage)
                if finish and done:
                    ordered = [reasons[i] for i in range(gen.choices)]
                    fields.update(
                        completion_tokens=gen.usage.completion_tokens,
                        finish_reason=ordered[0] if len(ordered) == 1 else ordered,
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
                "object": chunk(0, None, None)["object"],
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
