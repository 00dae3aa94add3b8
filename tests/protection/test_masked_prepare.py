"""`tdllm prepare --profile masked`: which projections carry a delta, and what rank r drops."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tdllm.model.checkpoint import Checkpoint
from tdllm.profiles.masked import build_masked
from tdllm.trusted.crossing import Crossing
from tdllm_lab.protection.masked import prepare_masked
from tests.protection.conftest import checkpoint_of
from tests.protection.engine_runs import greedy_tokens


def test_prepare_reports_the_tail_projections_and_the_rank_r_residual(
    tmp_path: Path, private_checkpoint: Checkpoint, base_tensors: dict[str, torch.Tensor]
) -> None:
    base = checkpoint_of("tiny-base", base_tensors)
    exact = json.loads(prepare_masked(base, private_checkpoint, None, tmp_path / "a").read_text())
    low = json.loads(prepare_masked(base, private_checkpoint, 2, tmp_path / "b").read_text())
    # K=2 perturbed blocks x 4 (fused) projections each
    assert exact["projections_with_delta"] == low["projections_with_delta"] == 8
    assert all(
        name.startswith(("model.layers.2.", "model.layers.3.")) for name in exact["relative_delta"]
    )
    assert exact["worst_relative_residual"] == 0.0
    assert 0.3 < low["worst_relative_residual"] < 1.0  # random noise is far from rank 2


def test_a_rank_r_delta_is_still_bit_identical_between_masked_and_reference(
    private_checkpoint: Checkpoint, base_tensors: dict[str, torch.Tensor]
) -> None:
    base = checkpoint_of("tiny-base", base_tensors)
    reference, _ = build_masked(private_checkpoint, base, torch.float32, None, rank=3)
    crossing = Crossing.open("cpu")
    try:
        masked, method = build_masked(private_checkpoint, base, torch.float32, crossing, rank=3)
        assert method.report.worst() > 0
        assert greedy_tokens(masked, n=4) == greedy_tokens(reference, n=4)
    finally:
        crossing.close()
