"""The `masked` profile: every block projection's public-base product runs one-time-padded on an
untrusted device; the TD keeps the secret delta, attention, norms, RoPE, SwiGLU, the embedding
and the lm_head.

`build_masked` loads MODEL into a `Transformer` whose block projections use a
`MaskedLinearMethod`, then installs each one against BASE: BASE's weight quantized to int8 goes
to the device (public), ``MODEL - BASE`` stays in the TD (dense, or its rank-r SVD with the
residual reported). With ``crossing=None`` the same build is the TD-only reference with the same
quantization, the path the masked one must match bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tdllm.errors import UsageError
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.linear import Linear, LinearMethodTable
from tdllm.model.loader import load_model
from tdllm.model.transformer import Transformer
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.masked_linear import MaskedLinearMethod

MASKED_LAYERS = "model.layers.*"  # every block projection; lm_head and embedding stay in the TD
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
MANIFEST_FILE = "masked.json"


@dataclass
class MaskedReport:
    """Per projection with a delta: relative residual of the kept delta (0: kept exactly)."""

    residuals: dict[str, float] = field(default_factory=dict)
    delta_norms: dict[str, float] = field(default_factory=dict)  # ||MODEL - BASE|| / ||BASE||

    def worst(self) -> float:
        return max(self.residuals.values(), default=0.0)


def base_weight(base: dict[str, torch.Tensor], linear: Linear) -> torch.Tensor:
    """BASE's weight for `linear` in its (fused) layout, float32."""
    prefix, _, leaf = linear.name.rpartition(".")
    parts = FUSED.get(leaf, (leaf,))
    return torch.cat([base[f"{prefix}.{p}.weight"].float() for p in parts])


def masked_linears(model: Transformer) -> list[Linear]:
    return [
        m
        for m in model.modules()
        if isinstance(m, Linear) and isinstance(m.method, MaskedLinearMethod)
    ]


def build_masked(
    checkpoint: Checkpoint,
    base: Checkpoint,
    dtype: torch.dtype,
    crossing: Crossing | None,
    rank: int | None = None,
    check_rate: float = 1.0,
) -> tuple[Transformer, MaskedReport]:
    """MODEL `checkpoint` served masked over `crossing` (None: the TD reference path)."""
    cfg, base_cfg = checkpoint.config, base.config
    if (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) != (
        base_cfg.num_layers,
        base_cfg.hidden_size,
        base_cfg.intermediate_size,
    ):
        raise UsageError("masked: MODEL and BASE have different shapes")
    if rank is not None and rank < 1:
        raise UsageError("masked: the delta rank must be at least 1")
    method = MaskedLinearMethod(crossing, check_rate)
    model, _ = load_model(checkpoint, dtype, LinearMethodTable([(MASKED_LAYERS, method)]))
    base_tensors = {n: t for n, t in base.tensors() if n.startswith("model.layers.")}
    report = MaskedReport()
    with torch.no_grad():
        for linear in masked_linears(model):
            w0 = base_weight(base_tensors, linear)
            delta_norm = float(
                (linear.get_parameter("weight").float() - w0).norm() / w0.norm().clamp_min(1e-30)
            )
            residual = method.install(linear, w0, rank)
            if delta_norm > 0:
                report.delta_norms[linear.name] = delta_norm
                report.residuals[linear.name] = residual
    model.masked_method = method  # type: ignore[assignment]  # found by `masked_method_of`
    return model, report


def masked_method_of(model: Transformer) -> MaskedLinearMethod | None:
    method = getattr(model, "masked_method", None)
    return method if isinstance(method, MaskedLinearMethod) else None


def prepare_masked(base: Checkpoint, model: Checkpoint, rank: int | None, out: Path) -> Path:
    """`tdllm prepare --profile masked`: which projections differ from BASE, and what the rank-r
    delta leaves out; written to ``OUT/masked.json`` (the delta itself is recomputed at load)."""
    _, report = build_masked(model, base, torch.float32, None, rank)
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
