"""What the engine hands back: a step's token for one request (`StepOutput`), and a whole
answer (`Completion`, from `Engine.generate`)."""

from __future__ import annotations

from dataclasses import dataclass

from tdllm.engine.sampling import TokenLogprobs


@dataclass
class StepOutput:
    """What one step produced for one request: a token, the text it made final, and the end."""

    request_id: int
    token_id: int
    text: str
    finish_reason: str | None  # "stop" (eos or stop string), "length", or None while running
    index: int = 0  # which of the request's n choices
    logprobs: TokenLogprobs | None = None  # when the request asked (`SamplingParams.logprobs`)


@dataclass
class Completion:
    request_id: int
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str
    index: int = 0  # which of the request's n choices
    logprobs: list[TokenLogprobs] | None = None  # one per token, when the request asked
