"""POST /v1/chat/completions: messages rendered with the model's own chat template; with tools,
their calls parsed out of the answer (tool_calls)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, request
from flask.typing import ResponseReturnValue

from tdllm.api.openai import generation, relay
from tdllm.api.openai.logprobs import check_policy, spelling
from tdllm.api.openai.protocol import decode_body, parse_chat
from tdllm.api.openai.tool_calls import CallStream, split_calls, stream_items
from tdllm.api.openai.tool_prompt import with_tools

blueprint = Blueprint("chat", __name__)
OBJECT = "chat.completion"
CHUNK_OBJECT = "chat.completion.chunk"


@blueprint.post("/v1/chat/completions")
def create_chat_completion() -> ResponseReturnValue:
    body = request.get_data(cache=False)
    settings = current_app.extensions["tdllm"].settings
    if settings.engine == "vllm":
        path, fields = "/v1/chat/completions", relay.CHAT_FIELDS
        return relay.relay(path, body, fields, settings.default_max_tokens)
    doc = decode_body(body)
    check_policy(doc, settings)
    parsed = parse_chat(doc)
    runner = generation.running_engine()
    generation.check_model(runner, parsed.sampling)
    tokenizer = runner.engine.tokenizer
    use = parsed.tools
    messages = parsed.messages if use is None else with_tools(parsed.messages, use.definitions)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))
    default_max = settings.default_max_tokens
    gen = generation.start(runner, [prompt], parsed.sampling, default_max, "chatcmpl", body)

    def head(kind: str) -> dict[str, Any]:
        return {"id": gen.id, "object": kind, "created": gen.created, "model": gen.model}

    spell = spelling(tokenizer)

    def logprobs_of(index: int) -> dict[str, Any] | None:
        """The logprobs of the choice's tokens not yet sent; None where not asked."""
        return None if gen.logprobs is None else gen.logprobs.chat(index, spell)

    calls = [CallStream(use) for _ in range(gen.choices)] if use is not None else []

    def chunk(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": text} if text else {}
        if calls and (text or finish):  # text that may begin a call is held till the end
            sendable = calls[index].feed(text or "")
            delta = {"content": sendable} if sendable else {}
            if finish:
                answer = calls[index].finish()
                content = sendable + (answer.content or "")
                delta = {"content": content} if content else {}
                if answer.calls:
                    delta["tool_calls"] = stream_items(answer.calls)
                finish = answer.finish_reason(finish)
            elif not delta:
                return {}
        logprobs = logprobs_of(index)
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return head(CHUNK_OBJECT) | {"choices": [choice]}

    if parsed.sampling.stream:
        # each choice opens with the assistant's role, as vLLM's chat stream does
        first = [
            head(CHUNK_OBJECT)
            | {
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            }
            for i in range(gen.choices)
        ]
        return generation.stream(gen, chunk, first)
    choices = []
    for i, (text, finish) in enumerate(generation.complete(gen)):
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if use is not None:
            answer = split_calls(text, use)
            if answer.calls:
                message = {"role": "assistant", "content": answer.content}
                message["tool_calls"] = list(answer.calls)
                finish = answer.finish_reason(finish)
        logprobs = logprobs_of(i)
        choices.append(
            {"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish}
        )
    return generation.answer(gen, head(OBJECT) | {"choices": choices, "usage": gen.usage.body()})
