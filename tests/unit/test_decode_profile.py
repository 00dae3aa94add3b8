"""`tdllm bench decode-profile` accounts for the whole profiled step, by category."""

from __future__ import annotations

import pytest
import torch

from tdllm.model.checkpoint import Checkpoint
from tdllm_lab.bench.decode_profile import category, profile_decode
from tests.sealing.synthetic import synthetic_checkpoint


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        ("aten::mm", "matmul"),
        ("aten::addmm", "matmul"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("aten::index_copy_", "other ops"),
        ("aten::mul", "other ops"),
    ],
)
def test_ops_fall_in_their_category(op: str, expected: str) -> None:
    assert category(op) == expected


def test_the_categories_add_up_to_the_profiled_step() -> None:
    checkpoint: Checkpoint = synthetic_checkpoint(seed=2)
    report = profile_decode(checkpoint, torch.float32, batch=2, steps=3, prompt_tokens=5)
    spent = report["ms_per_step_by_category"]
    assert set(spent) == {"matmul", "attention", "other ops", "outside any op"}
    assert spent["matmul"] > 0 and spent["attention"] > 0
    assert sum(spent.values()) == pytest.approx(report["profiled_ms_per_step"], rel=0.02)
    assert sum(report["share_by_category"].values()) == pytest.approx(1.0, abs=0.01)
    assert report["ms_per_step"] > 0 and report["aten_ops_per_step"] > 10
