"""POST /v1/completions: plain-text prompts (or token ids) continued by the model.

`prompt` is one prompt (text or token ids) or a list of them; each gets `n` choices, and choice
j of prompt i has index ``i * n + j`` (OpenAI's and vLLM's numbering). `response_format`
(vLLM's extension of this endpoint) constrains every choice as chat's does: the same field, the
same grammar (`protocol._sampling`)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, request
from flask.typing import ResponseReturnValue

from tdllm.api.errors import invalid
from tdllm.api.openai import generation, relay
from tdllm.api.openai.logprobs import check_policy, spelling
from tdllm.api.openai.protocol import decode_body, parse_completion

blueprint = Blueprint("completions", __name__)
OBJECT = "text_completion"
DEFAULT_MAX_TOKENS = 16  # the OpenAI API's documented default for this endpoint


@blueprint.post("/v1/completions")
def create_completion() -> ResponseReturnValue:
    body = request.get_data(cache=False)
    settings = current_app.extensions["tdllm"].settings
    if settings.engine == "vllm":
        fields = relay.COMPLETION_FIELDS
        return relay.relay("/v1/completions", body, fields, DEFAULT_MAX_TOKENS)
    doc = decode_body(body)
    check_policy(doc, settings)
    parsed = parse_completion(doc)
    runner = generation.running_engine()
    generation.check_model(runner, parsed.sampling)
    generation.check_choices(runner, parsed.sampling, len(parsed.prompts))  # before encoding
    prompts = []
    for i, prompt in enumerate(parsed.prompts):
        ids = runner.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            which = "the prompt" if len(parsed.prompts) == 1 else f"prompt[{i}]"
            raise invalid(f"{which} encodes to no tokens", "prompt")
        prompts.append(ids)
    gen = generation.start(runner, prompts, parsed.sampling, DEFAULT_MAX_TOKENS, "cmpl", body)

    spell = spelling(runner.engine.tokenizer)

    def choice(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
        # the legacy logprobs of the choice's tokens not yet sent; None where not asked
        logprobs = None if gen.logprobs is None else gen.logprobs.completion(index, spell)
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    def head() -> dict[str, Any]:
        return {"id": gen.id, "object": OBJECT, "created": gen.created, "model": gen.model}

    if parsed.sampling.stream:
        return generation.stream(gen, lambda i, t, f: head() | {"choices": [choice(i, t, f)]})
    choices = [choice(i, text, finish) for i, (text, finish) in enumerate(generation.complete(gen))]
    return generation.answer(gen, head() | {"choices": choices, "usage": gen.usage.body()})
