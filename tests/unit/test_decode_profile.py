"""`tdllm bench decode-profile` accounts for the whole profiled step, by category."""

from __future__ import annotations

import pytest
import torch

from tdllm.model.checkpoint import Checkpoint
from tdllm.model.quantized import quant_table
from tdllm_lab.bench.decode_profile import category, profile_decode
from tdllm_lab.bench.held_memory import weight_bytes
from tests.cpu_kernels import needs_vnni
from tests.sealing.synthetic import synthetic_checkpoint
from tests.tiny_model import tiny_model


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        ("aten::mm", "matmul"),
        ("aten::addmm", "matmul"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("aten::index_copy_", "other ops"),
        ("aten::mul", "other ops"),
        ("quantized::linear_dynamic", "matmul"),
        ("onednn::qlinear_pointwise", "matmul"),
        ("tdllm_avx512::w4a8", "matmul"),
        ("tdllm_avx2::w4a8", "matmul"),
        ("tdllm_avx2::w8a8g", "matmul"),
        ("tdllm_avx2::rows8", "other ops"),
        ("tdllm_avx2::decode_block", "blocks in one op"),
    ],
)
def test_ops_fall_in_their_category(op: str, expected: str) -> None:
    assert category(op) == expected


def test_the_categories_add_up_to_the_profiled_step() -> None:
    checkpoint: Checkpoint = synthetic_checkpoint(seed=2)
    report = profile_decode(checkpoint, torch.float32, batch=2, steps=3, prompt_tokens=5)
    spent = report["ms_per_step_by_category"]
    assert set(spent) == {"matmul", "attention", "blocks in one op", "other ops", "outside any op"}
    assert spent["matmul"] > 0 and spent["attention"] > 0
    assert sum(spent.values()) == pytest.approx(report["profiled_ms_per_step"], rel=0.02)
    assert sum(report["share_by_category"].values()) == pytest.approx(1.0, abs=0.01)
    assert report["ms_per_step"] > 0 and report["aten_ops_per_step"] > 10


@needs_vnni
def test_a_w8a8_step_spends_its_matmul_time_in_the_int8_kernel_and_no_rope_table_counts() -> None:
    checkpoint: Checkpoint = synthetic_checkpoint(seed=2)
    report = profile_decode(
        checkpoint, torch.float32, batch=1, steps=3, prompt_tokens=5, kernels="w8a8"
    )
    assert report["ms_per_step_by_category"]["matmul"] > 0
    int8_kernels = ("quantized::linear_dynamic", "onednn::qlinear_pointwise")
    assert any(op in report["matmul_ops"] for op in int8_kernels), report["matmul_ops"]
    model = tiny_model(methods=quant_table("w8a8"))
    rope = sum(b.untyped_storage().nbytes() for n, b in model.named_buffers() if "rope_" in n)
    assert rope > 0
    assert weight_bytes(model, skip_buffers=("rope_",)) == weight_bytes(model) - rope
