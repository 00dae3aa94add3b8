"""A4 (decoy vs real RoPE pairs) against `obfuscated`: a tiny real run; the bundled one is slow."""

from __future__ import annotations

import math

import pytest

from tdllm.model.checkpoint import Checkpoint
from tdllm_lab.attacks import a4_decoy_separation as a4
from tdllm_lab.attacks.device_view import Observation, observe
from tdllm_lab.attacks.registry import runner
from tdllm_lab.attacks.result import AttackOptions
from tests.protection.conftest import CFG, K

PROMPTS = [[(5 * i + 11 * j) % 97 for j in range(10)] for i in range(1, 4)]


@pytest.fixture(scope="module")
def obfuscated_run(tiny_pair: tuple[Checkpoint, Checkpoint]) -> Observation:
    private, base = tiny_pair
    options = AttackOptions("obfuscated", k=K, seed=2, quick=True)
    return observe(options, PROMPTS, 2, base=base, private=private)


def test_a4_separates_decoy_pairs_and_leaves_no_search(obfuscated_run: Observation) -> None:
    detail = a4.measure(obfuscated_run, obfuscated_run.private_layers())
    # tiny heads: 4 real RoPE pairs + 1 decoy pair per KV group
    assert detail["slots"] == K * CFG.num_kv_heads * 5 and detail["decoys"] == K * CFG.num_kv_heads
    assert detail["classifier_auc"] >= 0.95  # measured 1.0
    assert detail["feature_auc"]["cosine_to_base"] >= 0.95  # measured 1.0
    # decoys duplicate a real frequency: only those pairs stay ambiguous (1 bit per head) ...
    assert detail["feature_auc"]["frequency_multiplicity"] >= 0.8
    bits = detail["bits_left_per_head_mean"]
    assert bits["naive"] == pytest.approx(math.log2(5))
    assert bits["frequency"] == pytest.approx(1.0)
    # ... and the base cosine picks the real pair of each duplicated frequency
    assert bits["frequency_cosine"] == 0.0
    assert detail["real_pairs_ranked_first_by_cosine"] == 1.0


@pytest.mark.slow
def test_a4_on_the_bundled_model() -> None:
    result = runner("A4")(AttackOptions("obfuscated", quick=True))
    assert result.value >= 0.95 and not result.passed  # measured 1.0
    assert result.detail["bits_left_per_layer_min"]["frequency_cosine"] <= 2.0  # measured 0
