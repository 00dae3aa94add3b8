"""POST /v1/chat/completions: messages rendered with the model's own chat template."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, request
from flask.typing import ResponseReturnValue

from tdllm.api.openai import generation, relay
from tdllm.api.openai.protocol import decode_body, parse_chat

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
    parsed = parse_chat(decode_body(body))
    runner = generation.running_engine()
    generation.check_model(runner, parsed.sampling)
    tokenizer = runner.engine.tokenizer
    prompt = tokenizer.encode(tokenizer.apply_chat_template(parsed.messages))
    default_max = settings.default_max_tokens
    gen = generation.start(runner, [prompt], parsed.sampling, default_max, "chatcmpl", body)

    def head(kind: str) -> dict[str, Any]:
        return {"id": gen.id, "object": kind, "created": gen.created, "model": gen.model}

    def chunk(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
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
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
        for i, (text, finish) in enumerate(generation.complete(gen))
    ]
    return generation.answer(gen, head(OBJECT) | {"choices": choices, "usage": gen.usage.body()})
