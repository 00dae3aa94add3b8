"""A block's decode step in one call where all of it runs on our AVX2 kernels in the TD.

On a CPU without AVX-512 a small model's decode step is bound by the ~160 eager ops each block
costs (~2.5 us apiece), not by its weights (docs/performance.md, "One call a block").
``tdllm_avx2::decode_block`` (``kernels/decode_block_avx2.cpp``) runs the eager block's
arithmetic (norm, fused q/k/v, RoPE, cache write, attention, o, residual, norm, gate/up,
SwiGLU, down, residual) in one op, with the same products. `Block.forward` takes it for a
decode step (one token a row) when `for_block` found the block eligible and nothing else
claims the step: an attention core installed by a profile, a forward hook on a projection,
autograd, or a trace by torch.compile (whose graphs run the eager block).

Eligible: fp32, and each of the block's four projections on exactly `Int4W4A8Method` with the
AVX2 kernel (``quant: w4a8`` on such a CPU) or `Int8GroupAvx2Method` (``w8a8-avx2``). A
profile's method (masked's, split's device) is another type, so its crossings are never
skipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tdllm.model import avx2_kernel
from tdllm.model.int4_methods import Int4W4A8Method
from tdllm.model.int8_methods import Int8GroupAvx2Method
from tdllm.model.linear import Linear
from tdllm.model.rms_norm import RMSNorm

if TYPE_CHECKING:
    from tdllm.model.cache_layout import Batch


def _on_avx2_kernels(layer: Linear) -> bool:
    method = layer.method
    if type(method) is Int4W4A8Method:
        return method.kernel is avx2_kernel
    return type(method) is Int8GroupAvx2Method


class OneCallBlock:
    """A block's decode step as ``tdllm_avx2::decode_block``, from the block's parts: its two
    norms and four projections (q|k|v, o, gate|up, down), as `for_block` found them."""

    def __init__(
        self,
        norms: tuple[RMSNorm, RMSNorm],
        projections: tuple[Linear, Linear, Linear, Linear],
        heads: int,
        kv_heads: int,
        intermediate: int,
    ) -> None:
        self.norms, self.projections = norms, projections
        self.heads, self.kv_heads, self.intermediate = heads, kv_heads, intermediate

    def takes(self, x: torch.Tensor) -> bool:
        """Whether this step may run here: one fp32 token a row and nothing that the eager
        block would do besides (hooks, autograd, a trace; the block checks its attention
        core)."""
        return (
            x.shape[1] == 1
            and x.dtype == torch.float32
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and not any(p._forward_hooks or p._forward_pre_hooks for p in self.projections)
        )

    def __call__(
        self,
        x: torch.Tensor,
        batch: Batch,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        attention_norm, mlp_norm = self.norms
        qkv, o, gate_up, down = (p.qweight for p in self.projections)
        out: torch.Tensor = torch.ops.tdllm_avx2.decode_block(
            x.contiguous(),
            batch.slot_index,
            batch.positions,
            cos,
            signed_sin,
            attention_norm.weight,
            mlp_norm.weight,
            attention_norm.eps,
            qkv,
            o,
            gate_up,
            down,
            self.heads,
            self.kv_heads,
            self.intermediate,
            k_cache,
            v_cache,
        )
        return out


def for_block(
    norms: tuple[RMSNorm, RMSNorm],
    projections: tuple[Linear, Linear, Linear, Linear],
    heads: int,
    kv_heads: int,
    intermediate: int,
) -> OneCallBlock | None:
    """The one-call decode step of a block with these parts, or None where its eager form must
    run (see the module's docstring); call once every weight is in."""
    if any(norm.weight.dtype != torch.float32 for norm in norms):
        return None
    if not all(_on_avx2_kernels(p) for p in projections):
        return None
    return OneCallBlock(norms, projections, heads, kv_heads, intermediate)
