"""POST /v1/completions: a plain-text prompt (or token ids) continued by the model."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, request
from flask.typing import ResponseReturnValue

from tdllm.api.errors import invalid
from tdllm.api.openai import generation, relay
from tdllm.api.openai.protocol import decode_body, parse_completion

blueprint = Blueprint("completions", __name__)
OBJECT = "text_completion"
DEFAULT_MAX_TOKENS = 16  # the OpenAI API's documented default for this endpoint


@blueprint.post("/v1/completions")
def create_completion() -> ResponseReturnValue:
    body = request.get_data(cache=False)
    if current_app.extensions["tdllm"].settings.engine == "vllm":
        fields = relay.COMPLETION_FIELDS
        return relay.relay("/v1/completions", body, fields, DEFAULT_MAX_TOKENS)
    parsed = parse_completion(decode_body(body))
    runner = generation.running_engine()
    generation.check_model(runner, parsed.sampling)
    prompt = (
        runner.engine.tokenizer.encode(parsed.prompt)
        if isinstance(parsed.prompt, str)
        else list(parsed.prompt)
    )
    if not prompt:
        raise invalid("the prompt encodes to no tokens", "prompt")
    gen = generation.start(runner, prompt, parsed.sampling, DEFAULT_MAX_TOKENS, "cmpl", body)

    def choice(text: str | None, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def head() -> dict[str, Any]:
        return {"id": gen.id, "object": OBJECT, "created": gen.created, "model": gen.model}

    if parsed.sampling.stream:
        return generation.stream(gen, lambda t, f: head() | {"choices": [choice(t, f)]})
    text, finish = generation.complete(gen)
    return generation.answer(
        gen, head() | {"choices": [choice(text, finish)], "usage": gen.usage.body()}
    )
