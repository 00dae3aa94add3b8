"""What the TD CPU's kernels can use, asked once: thresholds between kernels depend on it."""

from __future__ import annotations

import torch

# AMX tiles: oneDNN's bf16 GEMM is then several times faster, so widening quantized weights to
# bf16 for it pays from far fewer rows (tdllm.model.quantized, tdllm.model.int4_widen)
HAS_AMX = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
