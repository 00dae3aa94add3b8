"""POST /tokenize and /detokenize: vLLM's endpoints, with vLLM's bodies and answers.

/tokenize encodes text (`prompt`) as /v1/completions does, or a conversation (`messages`) as
/v1/chat/completions does (the model's chat template, then the tokenizer), and answers
``{"count", "max_model_len", "tokens", "token_strs"}``; /detokenize decodes token ids back to
text, special tokens kept (as vLLM's does), ``{"prompt"}``. Nothing is generated, so nothing is
queued in the engine and no receipt is signed.

A prompt the generating endpoints would refuse for its length is refused here by the same rule
(a 400 stating the count), and so are ids outside the vocabulary and more ids than the context
holds. Text and ids stay out of the logs: the access line gets the count only.

Plain only: the tdllm-e2e/3 envelope names no endpoint, so these are not offered through
/v1/e2e/ (docs/api.md, "Tokenize and detokenize").

On the `vllm` engine both are vLLM's own, forwarded over its socket (`relay.exchange`): a field
allow-list (vLLM's fields less the ones that run client input as code), the model, and for
/detokenize the ids, are checked here first.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, g, jsonify, request
from flask.typing import ResponseReturnValue

from tdllm.api.errors import invalid, not_ready
from tdllm.api.openai import generation, relay
from tdllm.api.openai.protocol import (
    DetokenizeRequest,
    decode_body,
    parse_detokenize,
    parse_tokenize,
)
from tdllm.api.openai.tool_prompt import with_tools
from tdllm.vllm_engine.backend import VllmBackend

blueprint = Blueprint("tokenize", __name__)


@blueprint.post("/tokenize")
def tokenize() -> ResponseReturnValue:
    body = request.get_data(cache=False)
    if current_app.extensions["tdllm"].settings.engine == "vllm":
        return _tokenize_on_vllm(body)
    parsed = parse_tokenize(decode_body(body))
    runner = generation.running_engine()
    generation.check_model_name(parsed.model, runner.model_name)
    tokenizer = runner.engine.tokenizer
    if parsed.messages is None:
        text, param = parsed.prompt or "", "prompt"
    else:
        messages = with_tools(parsed.messages, parsed.tools) if parsed.tools else parsed.messages
        text = tokenizer.apply_chat_template(messages, parsed.add_generation_prompt)
        param = "messages"
    ids = tokenizer.encode(text, add_special_tokens=parsed.add_special_tokens)
    if ids:  # an empty text is zero tokens, not a mistake: nothing is generated from it
        generation.check_prompt_limits(runner, ids, param)
    g.log_fields = {"token_count": len(ids)}
    strs = [tokenizer.token_text(i) or "" for i in ids] if parsed.return_token_strs else None
    return jsonify(
        {
            "count": len(ids),
            "max_model_len": runner.max_model_len,
            "tokens": ids,
            "token_strs": strs,
        }
    )


@blueprint.post("/detokenize")
def detokenize() -> ResponseReturnValue:
    body = request.get_data(cache=False)
    parsed = parse_detokenize(decode_body(body))
    if current_app.extensions["tdllm"].settings.engine == "vllm":
        backend = relay.running_vllm()
        _check_ids(parsed, backend.model_name, backend.vocab_size, backend.max_model_len)
        doc = {"model": backend.model_name, "tokens": list(parsed.tokens)}
        answer = relay.exchange(backend, "/detokenize", doc)
        if not (isinstance(answer, dict) and isinstance(answer.get("prompt"), str)):
            raise not_ready("the vLLM engine answered /detokenize out of shape")
        g.log_fields = {"token_count": len(parsed.tokens)}
        return jsonify({"prompt": answer["prompt"]})
    runner = generation.running_engine()
    vocab_size = runner.engine.model.cfg.vocab_size
    _check_ids(parsed, runner.model_name, vocab_size, runner.max_model_len)
    g.log_fields = {"token_count": len(parsed.tokens)}
    text = runner.engine.tokenizer.decode(parsed.tokens, skip_special_tokens=False)
    return jsonify({"prompt": text})


def _check_ids(parsed: DetokenizeRequest, served: str, vocab_size: int, max_len: int) -> None:
    generation.check_model_name(parsed.model, served)
    if len(parsed.tokens) > max_len:
        raise invalid(
            f"tokens holds {len(parsed.tokens)} ids; at most {max_len} (max_model_len)", "tokens"
        )
    if parsed.tokens and max(parsed.tokens) >= vocab_size:
        raise invalid(f"token ids must be in [0, {vocab_size})", "tokens")


def _tokenize_on_vllm(raw: bytes) -> ResponseReturnValue:
    """vLLM's /tokenize, its answer as vLLM wrote it; a count vLLM's context cannot hold is
    refused as /v1/completions on vLLM refuses such a prompt."""
    doc = decode_body(raw)
    unknown = sorted(set(doc) - relay.TOKENIZE_FIELDS)
    if unknown:
        raise invalid(f"unrecognized request argument: {unknown[0]}", unknown[0])
    backend: VllmBackend = relay.running_vllm()
    model = doc.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model must be a string (see GET /v1/models)", "model")
    generation.check_model_name(model, backend.model_name)
    answer: Any = relay.exchange(backend, "/tokenize", doc | {"model": backend.model_name})
    count = answer.get("count") if isinstance(answer, dict) else None
    if not isinstance(count, int):
        raise not_ready("the vLLM engine answered /tokenize out of shape")
    g.log_fields = {"token_count": count}
    if count >= backend.max_model_len:
        param = "messages" if "messages" in doc else "prompt"
        raise invalid(
            f"the prompt has {count} tokens; the context is {backend.max_model_len} "
            "(prompt plus at least one generated token)",
            param,
            "context_length_exceeded",
        )
    return jsonify(answer)
