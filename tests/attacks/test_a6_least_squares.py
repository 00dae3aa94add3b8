"""A6 (least squares on device-observed pairs) against `obfuscated`: the private v_proj is
recovered exactly once the tokens observed reach the number of unknowns."""

from __future__ import annotations

import pytest

from tdllm.model.checkpoint import Checkpoint
from tdllm_lab.attacks import a6_least_squares as a6
from tdllm_lab.attacks.registry import runner
from tdllm_lab.attacks.result import AttackOptions
from tests.protection.conftest import CFG, K

UNKNOWNS = CFG.num_kv_heads * CFG.head_dim + 1  # 16 real v rows + 1 decoy row (tiny model)


@pytest.mark.parametrize("device", ["cpu", "process"])
def test_a6_recovers_the_private_v_proj_from_single_token_prompts(
    device: str, tiny_pair: tuple[Checkpoint, Checkpoint]
) -> None:
    private, base = tiny_pair
    options = AttackOptions("obfuscated", device=device, k=K, seed=0, quick=True)
    obs = a6.observe_first_tokens(options, 40, base, private)
    curves = a6.measure(obs, [8, 16, 24, 40])
    assert sorted(curves) == [f"model.layers.{CFG.num_layers - K + i}" for i in range(K)]
    for c in curves.values():
        assert c.observed_tokens == 40 and c.unknowns_per_output == UNKNOWNS
        assert c.errors[16] > 0.1  # fewer pairs than unknowns: underdetermined
        assert c.errors[24] < 1e-4 and c.errors[40] < 1e-4  # measured ~6e-8
        assert c.errors[24] < 0.01 * c.base_error  # far better than the public base
        assert c.tokens_to_10_percent == 24


@pytest.mark.slow
def test_a6_on_the_bundled_model() -> None:
    result = runner("A6")(AttackOptions("obfuscated", quick=True))
    assert result.value < 1e-3 and not result.passed  # measured 4e-6 at 256 tokens
    for layer in result.detail["layers"].values():
        assert layer["tokens_to_10_percent"] <= 256
