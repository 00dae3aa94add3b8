"""A15 (an API user distilling split's private tail): top-5 logprobs teach the attacker's tail
more than the sampled text of the same queries."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tdllm.errors import UsageError
from tdllm_lab.attacks import a15_tail_distillation as a15
from tdllm_lab.attacks.registry import runner
from tdllm_lab.attacks.result import AttackOptions
from tdllm_lab.protection.private_model import is_private
from tests.protection.conftest import CFG, K, checkpoint_of
from tests.tiny_model import tiny_tensors

PLAN = a15.Plan((8, 32), new_tokens=12, lr=3e-3)


def _prompts(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (6,), generator=g).tolist() for _ in range(count)]


@pytest.fixture(scope="module")
def measured() -> dict[str, Any]:
    """A private model whose tail is far from the base's (another random tail), so that there
    is a gap to close; the base, the tiny random model."""
    base = tiny_tensors(CFG, seed=3)
    other = tiny_tensors(CFG, seed=5)
    private = {n: other[n] if is_private(n, CFG, K) else t for n, t in base.items()}
    options = AttackOptions("split", k=K, seed=0, quick=True)
    return a15.measure(
        checkpoint_of("tiny-private", private),
        checkpoint_of("tiny-base", base),
        _prompts(32, 1),
        _prompts(16, 2),
        PLAN,
        options,
    )


def test_with_logprobs_the_distilled_tail_is_closer_after_the_same_queries(
    measured: dict[str, Any],
) -> None:
    text, top = measured["curves"]["text"], measured["curves"]["top-5"]
    base = measured["base"]["kl"]
    for n in PLAN.budgets:
        assert top[n]["kl"] < text[n]["kl"]
        assert top[n]["kl"] < base
    assert top[32]["kl"] < top[8]["kl"]  # more queries, more of the gap closed
    # measured (lr 3e-3): base 1.37 nats; text 1.29, 1.16; top-5 1.15, 1.00 at 8, 32 queries
    assert base - top[32]["kl"] > 1.5 * (base - text[32]["kl"])


def test_the_queries_are_served_by_split_and_every_token_has_its_logprobs(
    measured: dict[str, Any],
) -> None:
    assert measured["query_tokens"] == 32 * PLAN.new_tokens  # no stop token: all sampled
    assert measured["held_out_positions"] == 16 * PLAN.new_tokens


def test_a15_attacks_only_split() -> None:
    with pytest.raises(UsageError, match="split"):
        runner("A15")(AttackOptions("masked", quick=True))
