"""Penalties, logit_bias and min_tokens (vLLM's definitions, checked by hand on tiny logits),
min_tokens for stop strings, and `n` choices in the engine: one shared prefill, a generator per
choice, admitted and cancelled together."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.engine.sampling import LogitsProcessor, sample
from tdllm.engine.stops import TextStream
from tdllm.errors import UsageError
from tests.protection.engine_runs import NoTokenizer
from tests.tiny_model import tiny_model

LOGITS = torch.tensor([2.0, -1.0, 0.5, 0.0, 3.0])
PROMPT = [0, 1]
OUTPUT = [4, 4, 2]  # token 4 twice, token 2 once
STOPS = (3,)


def processed(params: SamplingParams, prompt: list[int] = PROMPT) -> torch.Tensor:
    """`LOGITS` after `params`' processors, once `OUTPUT` was generated."""
    processor = LogitsProcessor(params, prompt, len(LOGITS), STOPS)
    for token in OUTPUT:
        processor.add(token)
    return processor(LOGITS)


def test_presence_penalty_subtracts_once_per_generated_token_not_per_prompt_token() -> None:
    out = processed(SamplingParams(presence_penalty=0.25))
    assert out.tolist() == [2.0, -1.0, 0.25, 0.0, 2.75]  # tokens 2 and 4 only


def test_frequency_penalty_subtracts_per_occurrence_in_the_output() -> None:
    out = processed(SamplingParams(frequency_penalty=0.5))
    assert out.tolist() == [2.0, -1.0, 0.0, 0.0, 2.0]  # 0.5 - 1 * 0.5, 3.0 - 2 * 0.5


def test_negative_penalties_reward_repeats() -> None:
    out = processed(SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5))
    assert out.tolist() == [2.0, -1.0, 2.0, 0.0, 5.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    out = processed(SamplingParams(repetition_penalty=2.0))
    # prompt tokens 0 and 1, output tokens 2 and 4; token 3 (never seen) is untouched
    assert out.tolist() == [1.0, -2.0, 0.25, 0.0, 1.5]


def test_all_three_penalties_apply_in_vllms_order() -> None:
    """Repetition first, then frequency, then presence (vllm apply_penalties)."""
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    # token 2: 0.5 / 2 - 0.5 * 1 - 0.25 = -0.5; token 4: 3 / 2 - 0.5 * 2 - 0.25 = 0.25
    assert processed(params).tolist() == [1.0, -2.0, -0.5, 0.0, 0.25]


def test_logit_bias_is_added_and_a_token_given_twice_takes_the_last_bias() -> None:
    params = SamplingParams(logit_bias=((1, 5.0), (3, -0.5), (1, 1.5)))
    assert processed(params).tolist() == [2.0, 0.5, 0.5, -0.5, 3.0]


def test_min_tokens_masks_the_stop_tokens_until_enough_tokens_are_out() -> None:
    params = SamplingParams(min_tokens=2, logit_bias=((3, 100.0),))
    processor = LogitsProcessor(params, PROMPT, len(LOGITS), STOPS)
    seen = []
    for _ in range(3):
        out = processor(LOGITS)
        seen.append(out[3].item())
        processor.add(int(out.argmax()))
    assert seen == [-math.inf, -math.inf, 100.0]  # the bias cannot lift a masked stop token


def test_the_processor_leaves_the_shared_row_alone() -> None:
    """n choices of one prefill sample from one row of logits: none may change it."""
    row = LOGITS.clone()
    LogitsProcessor(SamplingParams(presence_penalty=1, min_tokens=1), PROMPT, 5, STOPS)(row)
    assert torch.equal(row, LOGITS)


def test_greedy_takes_the_argmax_after_the_penalties() -> None:
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=1.0)
    generator = params.generator()
    assert sample(LOGITS, params, generator) == 4
    assert sample(processed(params), params, generator) == 0  # 4: 1.5 - 2 = -0.5 < 0: 1.0


def test_logit_bias_changes_and_forces_the_greedy_choice() -> None:
    greedy = SamplingParams(temperature=0.0)
    generator = greedy.generator()
    banned = SamplingParams(temperature=0.0, logit_bias=((4, -100.0),))
    forced = SamplingParams(temperature=0.0, logit_bias=((1, 100.0),))
    assert sample(processed(banned), banned, generator) == 0
    assert sample(processed(forced), forced, generator) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 0},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -2.5},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": 2.5},
        {"logit_bias": ((1, 101.0),)},
        {"logit_bias": ((-1, 1.0),)},
        {"logit_bias": tuple((i, 1.0) for i in range(301))},
        {"min_tokens": -1},
        {"min_tokens": 5, "max_tokens": 4},
    ],
)
def test_rejects_invalid_sampling_parameters(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


# -- stop strings and min_tokens ---------------------------------------------------------------


class CharTokenizer:
    """Token id i is the character chr(i)."""

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


def stream_text(text: str, stop: tuple[str, ...], min_tokens: int) -> tuple[str, int]:
    """What a `TextStream` releases for `text` (a character a token), and how many tokens it
    took before it stopped."""
    stream = TextStream(CharTokenizer(), stop, min_tokens)  # type: ignore[arg-type]
    released = []
    for count, char in enumerate(text, 1):
        released.append(stream.push(ord(char)))
        if stream.stopped:
            return "".join(released), count
    return "".join(released) + stream.flush(), len(text)


def test_a_stop_string_inside_the_first_min_tokens_tokens_is_ordinary_text() -> None:
    assert stream_text("abXcdXef", ("X",), 0) == ("ab", 3)
    assert stream_text("abXcdXef", ("X",), 3) == ("abXcd", 6)  # the first X is token 3
    assert stream_text("abXcdXef", ("X",), 6) == ("abXcdXef", 8)


def test_a_stop_string_that_ends_after_min_tokens_counts_even_if_it_began_before() -> None:
    """vLLM checks the text of the tokens after min_tokens, less len(stop) - 1 characters."""
    assert stream_text("abXYcd", ("XY",), 3) == ("ab", 4)
    assert stream_text("abXYcd", ("XY",), 4) == ("abXYcd", 6)


# -- n choices in the engine -------------------------------------------------------------------


def counting_engine(
    shares_prefill: bool = True, max_batch: int = 4
) -> tuple[Engine, list[tuple[int, int]]]:
    """The tiny model's engine, and a list that gets each forward pass's (rows, tokens)."""
    model = tiny_model()
    engine = Engine(model, NoTokenizer(), max_batch=max_batch, max_seq_len=48)  # type: ignore[arg-type]
    engine.shares_prefill = shares_prefill
    shapes: list[tuple[int, int]] = []
    forward: Callable[..., torch.Tensor] = model.forward

    def counting(tokens, batch, cache, last_only=True):  # type: ignore[no-untyped-def]
        shapes.append(tuple(tokens.shape))
        return forward(tokens, batch, cache, last_only)

    model.forward = counting  # type: ignore[method-assign]
    return engine, shapes


PROMPT_IDS = [5, 17, 3, 42, 8, 9]


def test_n_greedy_choices_share_one_prefill_and_are_identical() -> None:
    engine, shapes = counting_engine()
    assert engine.shares_prefill  # the tiny model is td-only: every key and value is here
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, n=3)
    choices = engine.generate([PROMPT_IDS], params)
    assert [c.index for c in choices] == [0, 1, 2]
    assert choices[0].token_ids == choices[1].token_ids == choices[2].token_ids
    # one prefill pass, of one row, for three choices
    assert [s for s in shapes if s[1] > 1] == [(1, len(PROMPT_IDS))]
    alone, _ = counting_engine()
    single = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    assert alone.generate([PROMPT_IDS], single)[0].token_ids == choices[0].token_ids


def test_choices_of_a_model_whose_cache_is_not_all_here_are_prefilled_each() -> None:
    engine, shapes = counting_engine(shares_prefill=False)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, n=3)
    choices = engine.generate([PROMPT_IDS], params)
    assert len({tuple(c.token_ids) for c in choices}) == 1
    assert sum(rows for rows, width in shapes if width > 1) == 3  # the prompt three times


def test_sampled_choices_use_seed_plus_index_and_reproduce() -> None:
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True, n=3)
    first = [c.token_ids for c in counting_engine()[0].generate([PROMPT_IDS], params)]
    again = [c.token_ids for c in counting_engine()[0].generate([PROMPT_IDS], params)]
    assert first == again
    assert len({tuple(t) for t in first}) == 3  # three generators, three samples
    for i, tokens in enumerate(first):  # choice i is the single request with seed 11 + i
        alone = SamplingParams(max_tokens=8, temperature=1.0, seed=11 + i, ignore_eos=True)
        assert counting_engine()[0].generate([PROMPT_IDS], alone)[0].token_ids == tokens


def test_a_requests_choices_are_admitted_together_when_enough_slots_are_free() -> None:
    engine, _ = counting_engine(max_batch=4)
    long = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, n=2)
    three = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, n=3)
    first = engine.submit(PROMPT_IDS, long)
    second = engine.submit([1, 2, 3], three)
    with torch.inference_mode():
        engine.step()
        assert {(r.id, r.index) for r in engine.running} == {(first, 0), (first, 1)}
        assert len(engine.waiting) == 3  # two slots free, three needed: all three wait
        engine.cancel(first)  # every choice of it, and their slots
        assert not engine.running and len(engine.free_slots) == 4
        outputs = engine.step()
    assert sorted((o.request_id, o.index) for o in outputs) == [(second, i) for i in range(3)]


def test_the_engine_refuses_more_choices_than_slots_and_bias_outside_the_vocabulary() -> None:
    engine, _ = counting_engine(max_batch=2)
    with pytest.raises(UsageError, match="n is 3"):
        engine.submit(PROMPT_IDS, SamplingParams(n=3))
    with pytest.raises(UsageError, match="logit_bias"):
        engine.submit(PROMPT_IDS, SamplingParams(logit_bias=((97, 1.0),)))  # vocabulary: 97
    assert not engine.waiting


def test_penalties_change_what_the_engine_generates_greedily() -> None:
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    base = counting_engine()[0].generate([PROMPT_IDS], plain)[0].token_ids
    assert len(set(base)) < len(base)  # a tiny random model repeats itself
    params = SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True, presence_penalty=2.0, frequency_penalty=2.0
    )
    penalized = counting_engine()[0].generate([PROMPT_IDS], params)[0].token_ids
    assert len(set(penalized)) > len(set(base))
