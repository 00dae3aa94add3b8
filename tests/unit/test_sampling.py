"""The sampler: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import math

import pytest
import torch

from tdllm.engine.sampling import TOP_P_CANDIDATES, SamplingParams, sample

LOGITS = torch.tensor([0.5, 3.0, 2.9, -1.0, 0.0, 1.0])


def draws(params: SamplingParams, n: int = 200) -> list[int]:
    g = params.generator()
    return [sample(LOGITS, params, g) for _ in range(n)]


def test_temperature_zero_is_argmax() -> None:
    assert set(draws(SamplingParams(temperature=0.0), 20)) == {1}


def test_same_seed_gives_same_samples() -> None:
    p = SamplingParams(temperature=1.0, seed=1234)
    assert draws(p) == draws(p)


def test_different_seeds_give_different_samples() -> None:
    one, two = SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, seed=2)
    assert draws(one) != draws(two)


def test_top_k_limits_choices_to_the_k_best() -> None:
    assert set(draws(SamplingParams(temperature=1.5, top_k=2, seed=0))) == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = LOGITS.softmax(-1)  # token 1 alone has ~0.45 of the mass, 1 and 2 together ~0.86
    assert 0.4 < float(probs[1]) < 0.5
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.3, seed=0))) == {1}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.8, seed=0))) == {1, 2}


def test_high_temperature_reaches_unlikely_tokens() -> None:
    assert len(set(draws(SamplingParams(temperature=2.0, seed=0), 500))) == len(LOGITS)


@pytest.mark.parametrize("temperature", [4.7e-126, 1e-30, float.fromhex("0x1p-1074")])
def test_a_vanishing_temperature_samples_the_argmax_instead_of_failing(temperature: float) -> None:
    """Regression: logits / 1e-126 overflowed to inf, softmax gave NaN and the engine step (every
    request in it, then the service) failed; the API accepts any temperature in [0, 2]."""
    params = SamplingParams(temperature=temperature, top_p=1.175494351e-38, seed=0)
    assert set(draws(params, 20)) == {1}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"temperature": -0.1},
        {"temperature": 2.5},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"stop": ("",)},
        {"stop": ("a", "b", "c", "d", "e")},
    ],
)
def test_rejects_invalid_parameters(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_draws_follow_the_softmax_of_the_logits() -> None:
    """Each token's share of 20000 draws is its probability within five standard errors (a
    sampler that skewed the distribution, or dropped a token, fails; fixed seed: no flake)."""
    n = 20_000
    counts = torch.bincount(
        torch.tensor(draws(SamplingParams(temperature=1.0, seed=7), n)), minlength=len(LOGITS)
    )
    probs = LOGITS.softmax(-1).double()
    spread = (probs * (1 - probs) / n).sqrt()
    assert ((counts / n - probs).abs() <= 5 * spread).all(), (counts / n, probs)


def test_tokens_without_mass_are_never_drawn() -> None:
    logits = torch.full((1000,), -math.inf)
    logits[[3, 500, 999]] = torch.tensor([0.0, 1.0, 2.0])
    g = torch.Generator().manual_seed(0)
    drawn = {sample(logits, SamplingParams(temperature=1.0), g) for _ in range(3000)}
    assert drawn == {3, 500, 999}


def test_a_nucleus_wider_than_the_sorted_candidates_is_cut_over_the_whole_vocabulary() -> None:
    """top_p sorts the most likely TOP_P_CANDIDATES first; a flatter distribution whose nucleus
    holds more tokens than that still keeps exactly the nucleus (here half of 3000 equal ones)."""
    logits = torch.zeros(3000)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_p=0.5)
    drawn = {sample(logits, params, g) for _ in range(20_000)}
    assert TOP_P_CANDIDATES < len(drawn) <= 1500
