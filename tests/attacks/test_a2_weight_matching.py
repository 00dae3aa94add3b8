"""A2 (row matching of device weights against the public base) against `obfuscated` and `split`.

Fast: a real obfuscated run of the tiny model (base random, private = base with its last K
blocks and head perturbed). Slow: `tdllm attack A2 --quick` on the bundled model.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tdllm.model.checkpoint import Checkpoint
from tdllm_lab.attacks import a2_weight_matching as a2
from tdllm_lab.attacks.device_view import Observation, observe
from tdllm_lab.attacks.registry import runner
from tdllm_lab.attacks.result import AttackOptions
from tests.protection.conftest import CFG, K
from tests.tiny_model import tiny_tensors

PROMPTS = [[(7 * i + 13 * j) % 97 for j in range(12)] for i in range(1, 5)]


@pytest.fixture(scope="module")
def obfuscated_run(tiny_pair: tuple[Checkpoint, Checkpoint]) -> Observation:
    private, base = tiny_pair
    options = AttackOptions("obfuscated", k=K, seed=0, quick=True)
    return observe(options, PROMPTS, 3, base=base, private=private)


def test_a2_recovers_the_private_rows_of_obfuscated_device_weights(
    obfuscated_run: Observation,
) -> None:
    detail = a2.measure(obfuscated_run, obfuscated_run.private_layers(), None)
    assert detail["private_layers"] == [CFG.num_layers - K + i for i in range(K)]
    # measured 1.0 (every row of q, k, v, o, gate|up, down and lm_head) and 0.97
    assert detail["private_rows_assigned"] >= 0.99
    assert detail["private_rows_recovered"] >= 0.99
    assert detail["gain_recovered"] >= 0.9
    assert detail["median_relative_weight_error"] < 0.25 * detail["median_base_relative_error"]


def test_a2_against_an_unrelated_base_recovers_nothing(obfuscated_run: Observation) -> None:
    unrelated = {n: t.float() for n, t in tiny_tensors(CFG, seed=99).items()}
    detail = a2.measure(
        dataclasses.replace(obfuscated_run, base=unrelated), obfuscated_run.private_layers(), None
    )
    assert detail["private_rows_recovered"] <= 0.1
    assert detail["gain_recovered"] < 0.1


def test_assignment_undoes_scale_sign_and_permutation_and_skips_decoys() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 16, generator=g)
    order = torch.randperm(48, generator=g)
    rows = torch.cat((base * torch.linspace(-2, 3, 40)[:, None], torch.randn(8, 16, generator=g)))
    device = rows[order]
    assigned, estimate = a2.match_rows(device, base)
    position = torch.empty_like(order)
    position[order] = torch.arange(48)
    assert assigned.tolist() == position[:40].tolist()
    assert torch.allclose(estimate, base.double(), atol=1e-9)


@pytest.mark.slow
def test_a2_on_the_bundled_model() -> None:
    result = runner("A2")(AttackOptions("obfuscated", quick=True))
    assert result.value >= 0.99 and not result.passed  # measured 0.9998 (quick: last 2 blocks)
    assert result.detail["gain_recovered"] >= 0.95  # measured 0.998
    split = runner("A2")(AttackOptions("split", quick=True))
    assert split.value == 0.0 and split.passed
    assert split.detail["private_matrices_on_device"] == []
    masked = runner("A2")(AttackOptions("masked", quick=True))  # the device holds the base, int8
    assert masked.value <= 0.01 and masked.passed
    assert masked.detail["gain_recovered"] <= 0.05
