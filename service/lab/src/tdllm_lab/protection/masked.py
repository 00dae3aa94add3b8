"""`tdllm prepare --profile masked`: what the masked profile (profiles/masked.py) keeps of MODEL
in the TD, measured before serving: which projections differ from BASE, and what a rank-r delta
leaves out."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tdllm.model.checkpoint import Checkpoint
from tdllm.profiles.masked import build_masked

MANIFEST_FILE = "masked.json"


def prepare_masked(base: Checkpoint, model: Checkpoint, rank: int | None, out: Path) -> Path:
    """`tdllm prepare --profile masked`: which projections differ from BASE, and what the rank-r
    delta leaves out; written to ``OUT/masked.json`` (the delta itself is recomputed at load)."""
    _, method = build_masked(model, base, torch.float32, None, rank)
    report = method.report
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "profile": "masked",
        "base": base.name,
        "model": model.name,
        "rank": rank,
        "projections_with_delta": len(report.delta_norms),
        "worst_relative_residual": report.worst(),
        "relative_delta": report.delta_norms,
        "relative_residual": report.residuals,
    }
    path = out / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path
