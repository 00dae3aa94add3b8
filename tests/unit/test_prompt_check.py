"""The one prompt check: each rule, its boundary, and the code the API maps to a 400."""

from __future__ import annotations

import pytest

from tdllm.engine.prompt_check import PromptError, check_prompt
from tdllm.errors import UsageError

VOCAB = 100
CONTEXT = 10


def problem(prompt: list[int], max_prompt_tokens: int | None = None) -> PromptError:
    with pytest.raises(PromptError) as caught:
        check_prompt(prompt, vocab_size=VOCAB, context=CONTEXT, max_prompt_tokens=max_prompt_tokens)
    return caught.value


def test_a_prompt_within_every_limit_passes() -> None:
    check_prompt([0, 1, VOCAB - 1], vocab_size=VOCAB, context=CONTEXT, max_prompt_tokens=5)


def test_an_empty_prompt_is_refused() -> None:
    refused = problem([])
    assert refused.code == "empty"
    assert str(refused) == "the prompt is empty"


def test_a_problem_is_a_usage_error_so_the_cli_prints_it_and_exits_2() -> None:
    refused = problem([])
    assert isinstance(refused, UsageError)
    assert refused.exit_code == 2


def test_a_prompt_at_the_max_prompt_limit_passes_one_more_token_is_refused() -> None:
    check_prompt([1] * 5, vocab_size=VOCAB, context=CONTEXT, max_prompt_tokens=5)
    refused = problem([1] * 6, max_prompt_tokens=5)
    assert refused.code == "context_length_exceeded"
    assert str(refused) == "the prompt has 6 tokens; the limit is 5"


def test_without_a_max_prompt_limit_only_the_context_bounds_the_length() -> None:
    check_prompt([1] * (CONTEXT - 1), vocab_size=VOCAB, context=CONTEXT)


def test_the_context_keeps_room_for_one_generated_token() -> None:
    check_prompt([1] * (CONTEXT - 1), vocab_size=VOCAB, context=CONTEXT)
    refused = problem([1] * CONTEXT)
    assert refused.code == "context_length_exceeded"
    assert str(refused) == (
        f"the prompt has {CONTEXT} tokens; the context is {CONTEXT} "
        "(prompt plus at least one generated token)"
    )


def test_the_max_prompt_limit_is_checked_before_the_context() -> None:
    refused = problem([1] * (CONTEXT + 1), max_prompt_tokens=CONTEXT - 2)
    assert str(refused) == f"the prompt has {CONTEXT + 1} tokens; the limit is {CONTEXT - 2}"


def test_the_last_vocabulary_id_passes_the_vocabulary_size_is_refused() -> None:
    check_prompt([VOCAB - 1], vocab_size=VOCAB, context=CONTEXT)
    refused = problem([3, VOCAB])
    assert refused.code == "token_out_of_range"
    assert str(refused) == f"token ids must be in [0, {VOCAB})"


@pytest.mark.parametrize("prompt", [[-1], [5, -1, 7], [-(2**40)]])
def test_negative_token_ids_are_refused(prompt: list[int]) -> None:
    assert problem(prompt).code == "token_out_of_range"


def test_id_zero_passes() -> None:
    check_prompt([0], vocab_size=VOCAB, context=CONTEXT)


def test_the_length_is_checked_before_the_ids() -> None:
    """A too-long prompt of bad ids reports its length (the API names that its context error)."""
    assert problem([VOCAB] * CONTEXT).code == "context_length_exceeded"
