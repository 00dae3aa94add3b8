"""A14: tampered masked products are never accepted, and honest ones never alarm."""

from __future__ import annotations

import pytest
import torch

from tdllm_lab.attacks.a14_tampering import KINDS, measure, run
from tdllm_lab.attacks.result import AttackOptions


def test_every_kind_of_forgery_is_detected_on_a_masked_projection() -> None:
    weights = {
        "model.layers.0.mlp.down_proj": torch.randn(
            48, 96, generator=torch.Generator().manual_seed(0)
        )
    }
    detail = measure(weights, "cpu", trials=len(KINDS) * 20)
    assert detail["undetected_total"] == 0
    assert detail["false_alarms"] == 0
    assert detail["detected"] == dict.fromkeys(KINDS, 20)


@pytest.mark.slow
def test_a14_on_bundled_projections_has_no_undetected_forgery_in_ten_thousand_trials() -> None:
    result = run(AttackOptions(profile="masked"))
    assert result.detail["trials"] == 10_000
    assert result.value == 0.0 and result.passed
