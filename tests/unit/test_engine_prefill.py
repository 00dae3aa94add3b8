"""The engine prefills prompts that arrive together in one padded pass, and what it generates is
what it generates for each prompt alone."""

from __future__ import annotations

import torch

from tdllm.engine import Engine, SamplingParams
from tests.protection.engine_runs import NoTokenizer
from tests.tiny_model import tiny_model

PROMPTS = [[5, 17, 3, 42, 8], [9, 1, 60, 2], [33, 34, 35, 36, 37, 38, 39], [70], [4, 4, 4, 4, 4]]


def _generate(batched: bool, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
    model = tiny_model()
    engine = Engine(model, NoTokenizer(), max_batch=8, max_seq_len=48)  # type: ignore[arg-type]
    engine.batched_prefill = batched
    passes = 0
    forward = model.forward

    def counting(tokens, batch, cache, last_only=True):  # type: ignore[no-untyped-def]
        nonlocal passes
        passes += tokens.shape[1] > 1
        return forward(tokens, batch, cache, last_only)

    model.forward = counting  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    return [c.token_ids for c in engine.generate(prompts, params)], passes


def test_prompts_that_arrive_together_share_prefill_passes_and_generate_the_same_tokens() -> None:
    alone, alone_passes = _generate(False, PROMPTS)
    together, together_passes = _generate(True, PROMPTS)
    assert together == alone
    assert alone_passes == 4  # every prompt but the one-token one is its own multi-token pass
    # lengths 1, 4, 5, 5, 7: padding at most half a row groups (1) and (4, 5, 5, 7)
    assert together_passes == 1


def test_a_long_prompt_is_not_padded_into_a_batch_of_short_ones() -> None:
    engine = Engine(tiny_model(), NoTokenizer(), max_batch=8, max_seq_len=48)  # type: ignore[arg-type]
    for prompt in ([1, 2, 3], [4, 5, 6, 7], [8] * 30):
        engine.submit(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    admitted = list(engine.waiting)
    groups = engine._prefill_groups(admitted)
    assert [[len(r.prompt) for r in g] for g in groups] == [[3, 4], [30]]
    with torch.inference_mode():
        assert len(engine.step()) == 3  # each still gets its first token
