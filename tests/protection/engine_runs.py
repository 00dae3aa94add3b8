"""Greedy generation with the real engine, for tiny models (token ids only; no tokenizer)."""

from __future__ import annotations

from tdllm.engine import Engine, SamplingParams
from tdllm.model.transformer import Transformer
from tdllm.profiles.masked import masked_linears
from tdllm.trusted.masked_linear import MaskedLinearMethod

PROMPTS = [[5, 17, 3, 42, 8], [9, 1, 60, 2], [33, 34, 35, 36, 37, 38, 39], [70]]


class NoTokenizer:
    """Enough of a tokenizer for the engine: no stop tokens, empty text."""

    stop_token_ids: frozenset[int] = frozenset()

    def decode(self, ids: list[int]) -> str:
        return ""


def greedy_tokens(
    model: Transformer, prompts: list[list[int]] = PROMPTS, n: int = 12
) -> list[list[int]]:
    engine = Engine(model, NoTokenizer(), max_batch=4, max_seq_len=48)  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return [c.token_ids for c in engine.generate(prompts, params)]


def masked_method(model: Transformer) -> MaskedLinearMethod:
    """The one `MaskedLinearMethod` a masked model's block projections share."""
    (method,) = {id(m.method): m.method for m in masked_linears(model)}.values()
    assert isinstance(method, MaskedLinearMethod)
    return method
