"""A1 (non-public bytes on the device) and A8 (prompt recovery from layer-0 device data), on the
tiny model for split and masked; the bundled model in the slow runs."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import binom

from tdllm.errors import UsageError
from tdllm.model.checkpoint import Checkpoint
from tdllm.trusted import publishable
from tdllm_lab.attacks import a1_private_bytes as a1
from tdllm_lab.attacks import a8_prompt_recovery as a8
from tdllm_lab.attacks.result import AttackOptions
from tests.protection.conftest import K

PROMPTS = [[(7 * i + 13 * j) % 97 for j in range(12)] for i in range(1, 7)]


@pytest.mark.parametrize("profile", ["split", "masked"])
def test_a1_finds_no_private_byte_on_the_device(
    profile: str, tiny_pair: tuple[Checkpoint, Checkpoint]
) -> None:
    target = a1.open_target(profile, "cpu", *tiny_pair, K, 32)
    try:
        detail = a1.measure(target, PROMPTS[:2], new_tokens=3)
    finally:
        target.close()
    assert detail["haystack_bytes"] > 50_000
    assert detail["resident_weights"] > 0
    assert detail["non_public_resident_bytes"] == 0
    assert detail["private_window_hits"] == 0
    assert detail["private_windows_searched"] > 100


def test_a1_search_finds_private_bytes_a_leaky_device_held(
    tiny_pair: tuple[Checkpoint, Checkpoint],
) -> None:
    target = a1.open_target("masked", "cpu", *tiny_pair, K, 32)
    try:
        secret = target.private["model.layers.3.mlp.down_proj.weight"]
        # what a buggy profile might send: trusted code vouching for the wrong tensor
        target.crossing.put("leak", publishable.obfuscated(secret[:2].clone()))
        target.crossing.put(
            "spare.int8", publishable.obfuscated(torch.zeros(128, 32, dtype=torch.int8))
        )
        detail = a1.measure(target, PROMPTS[:1], new_tokens=1)
    finally:
        target.close()
    assert detail["private_window_hits"] >= 1
    assert "model.layers.3.mlp.down_proj.weight" in detail["private_tensors_found"]
    assert set(detail["non_public_resident"]) == {"leak", "spare.int8"}


def test_a1_skips_a_private_tensor_that_equals_a_public_one_under_another_name() -> None:
    """The distill recipe keeps BASE's head (a copy of the embedding, untied): those bytes sit
    on the device as the embedding and are no secret, so they must not count as found, while
    a tail tensor that did change is still searched."""
    base = {
        "model.embed_tokens.weight": torch.randn(64, 16),
        "model.layers.3.mlp.down_proj.weight": torch.randn(16, 32),
    }
    private = {
        "lm_head.weight": base["model.embed_tokens.weight"].clone(),
        "model.layers.3.mlp.down_proj.weight": base["model.layers.3.mlp.down_proj.weight"] + 0.1,
    }
    names = {name for name, _ in a1.private_windows(private, base)}
    assert names == {
        "model.layers.3.mlp.down_proj.weight",
        "model.layers.3.mlp.down_proj.weight:int8",
    }


@pytest.mark.parametrize("profile", ["split", "masked"])
def test_a8_recovers_split_prompts_and_not_masked_ones(
    profile: str, tiny_pair: tuple[Checkpoint, Checkpoint]
) -> None:
    target = a1.open_target(profile, "cpu", *tiny_pair, K, 32)
    try:
        detail = a8.measure(target, PROMPTS)
    finally:
        target.close()
    if profile == "split":
        assert detail["nearest_neighbour_recovery"] >= 0.95
        assert detail["membership_bag_of_words_f1"] >= 0.9
    else:  # fresh random pads: each guess is right by chance only (1/97 per token here), so
        # 4 of 72 happens (~0.7% of runs, past a8.THRESHOLD); fail only beyond the 1e-6 tail
        tokens, chance = detail["prompt_tokens"], detail["chance_rate"]
        assert detail["nearest_neighbour_recovery"] <= binom.isf(1e-6, tokens, chance) / tokens
        assert detail["membership_bag_of_words_f1"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["split", "masked"])
def test_a1_on_the_bundled_model_finds_zero_non_public_bytes(profile: str) -> None:
    result = a1.run(AttackOptions(profile=profile, quick=True))
    assert result.value == 0 and result.passed


@pytest.mark.slow
def test_a8_on_the_bundled_model_masked_hides_prompts_split_does_not() -> None:
    masked = a8.run(AttackOptions(profile="masked"))
    assert masked.value <= a8.THRESHOLD and masked.passed
    split = a8.run(AttackOptions(profile="split"))
    assert split.value >= 0.95 and not split.passed


def test_a8_recovers_every_prompt_token_from_the_obfuscated_profiles_plain_inputs(
    tiny_pair: tuple[Checkpoint, Checkpoint],
) -> None:
    # the seed's scheme permutes and pads weights; the activations it sends stay plaintext
    target = a1.open_target("obfuscated", "cpu", *tiny_pair, K, 32)
    try:
        detail = a8.measure(target, PROMPTS)
    finally:
        target.close()
    assert detail["prompt_tokens"] == 72
    assert detail["nearest_neighbour_recovery"] >= 0.95
    assert detail["membership_bag_of_words_f1"] >= 0.9


def test_a1_refuses_the_obfuscated_profile() -> None:
    with pytest.raises(UsageError, match="A1 targets"):
        a1.run(AttackOptions(profile="obfuscated", quick=True))
