"""Every projection in the model is a `Linear` whose matmul is delegated to a `LinearMethod`.

This is vLLM's split: the layer owns its name and shape; the method owns the parameters it needs
(`create_weights`) and how the product is computed (`apply`). A `LinearMethodTable` maps layer
names (glob patterns over names like ``model.layers.3.self_attn.qkv_proj``) to methods, so a later
profile can run one layer on the TD CPU, another on an untrusted device or behind masks, without
the model file knowing. Once every tensor is in, `after_load` lets each method turn the loaded
weight into its own form (a profile's device placement, masks, obfuscation). The plain TD-CPU
method is the model's default; the profiles (`tdllm.profiles`) bring the others.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class LinearMethod(Protocol):
    """How one projection's weights are held and how ``y = x @ W.T`` is computed."""

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        """Register on `layer` the parameters/buffers this method needs (shapes from `layer`)."""
        ...

    def load_weight(self, layer: Linear, weight: torch.Tensor, row_offset: int = 0) -> None:
        """Take checkpoint rows ``[n, in_features]`` for output rows ``row_offset:row_offset+n``.

        Fused projections (q|k|v, gate|up) receive one checkpoint tensor per shard.
        """
        ...

    def after_load(self, layer: Linear) -> None:
        """Every checkpoint tensor is in: turn what was loaded into what `apply` runs on (vLLM's
        ``process_weights_after_loading``), e.g. quantize it, or place it on a device and drop
        the TD's plaintext copy. Called once per layer, in module order."""
        ...

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """Return ``x @ W.T`` for ``x[..., in_features]``."""
        ...


class Linear(nn.Module):
    """A bias-free projection whose storage and compute belong to its `LinearMethod`."""

    def __init__(
        self,
        name: str,
        in_features: int,
        out_features: int,
        method: LinearMethod,
        dtype: torch.dtype,
        shard_sizes: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.in_features = in_features
        self.out_features = out_features
        # rows of each checkpoint tensor a fused projection (q|k|v, gate|up) is made of
        self.shard_sizes = shard_sizes or [out_features]
        assert sum(self.shard_sizes) == out_features
        self.method = method
        # True when the weight is another module's parameter (a tied lm_head reads the
        # embedding): a method must not replace or free it
        self.shared_weight = False
        method.create_weights(self, dtype)

    def load_weight(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{self.name}: checkpoint weight has shape {tuple(weight.shape)}, "
                f"expected {(self.out_features, self.in_features)}"
            )
        self.method.load_weight(self, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def extra_repr(self) -> str:
        return f"{self.name}, {self.in_features}->{self.out_features}, {type(self.method).__name__}"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN then runs bf16 GEMMs natively (Sapphire Rapids and later)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


# On CPUs without native bf16, PyTorch's bf16 GEMM is several times slower than fp32 once more
# than a few rows are multiplied (measured: 6-7x at a 128-token prefill on an AVX2 EPYC). There we
# widen the operands to fp32 (exact) block by block and round the result to bf16 once, which is
# what a native bf16 GEMM computes anyway (fp32 accumulation), minus the summation order.
UPCAST_MIN_ROWS = 16  # below this (decode batches) the native bf16 GEMM is as fast or faster
UPCAST_BLOCK_ROWS = 2048  # weight rows widened at a time: the fp32 block stays small and warm


class TdCpuKernels:
    """A method whose weights live in TD memory and whose product is computed there by stock
    CPU kernels, each row of ``x`` on its own: prompts padded into one prefill get what each
    would alone (`Transformer.prefills_together`), up to rounding where the kernel is chosen
    by row count (bf16 widening here, int8's prefill path). Plain and weight-only quantized.

    A subclass whose product leaves the TD (masked's: the public GEMM on a device) says so in
    `leaves_td`: a compiled decode step must not trace through it."""

    leaves_td = False


class PlainCpuMethod(TdCpuKernels):
    """Weights in TD memory, matmul on the TD CPU with stock PyTorch (oneDNN; AMX where present)."""

    def __init__(self, native_bf16: bool | None = None) -> None:
        self.native_bf16 = cpu_has_native_bf16() if native_bf16 is None else native_bf16

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        weight = torch.empty(layer.out_features, layer.in_features, dtype=dtype)
        layer.weight = nn.Parameter(weight, requires_grad=False)

    def load_weight(self, layer: Linear, weight: torch.Tensor, row_offset: int = 0) -> None:
        copy_unless_same(_weight(layer).data[row_offset : row_offset + weight.shape[0]], weight)

    def after_load(self, layer: Linear) -> None:
        pass  # the loaded weight is what the kernel reads

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        weight = _weight(layer)
        if weight.dtype == torch.bfloat16 and not self.native_bf16:
            if x.numel() // x.shape[-1] >= UPCAST_MIN_ROWS:
                return widened_linear(
                    x.float(), weight, torch.float32, torch.bfloat16, UPCAST_BLOCK_ROWS
                )
        return F.linear(x, weight)


def can_prepack_bf16() -> bool:
    """oneDNN's prepacked bf16 linear is there and the CPU runs bf16 natively."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
        and cpu_has_native_bf16()
    )


class PrepackedCpuMethod(PlainCpuMethod):
    """`PlainCpuMethod`, with each bf16 weight reordered once, after loading, into oneDNN's
    blocked layout (``mkldnn._reorder_linear_weight``) and multiplied by
    ``mkldnn._linear_pointwise``: the same oneDNN bf16 GEMM without reordering the weight on
    every call. Measured bit-identical to ``F.linear`` at decode's row counts (on AMX, from 64
    rows, oneDNN's two kernels block the sum differently: a few outputs in 10^4 one bf16 step
    apart) and 1.1-2.2x faster from 1 to 128 rows (docs/performance.md, "Decode without the
    overhead"). The reordered copy replaces the plain one (no second copy in memory); a shared
    weight (a tied lm_head) stays plain, as do fp32 weights and CPUs without native bf16, where
    it is exactly `PlainCpuMethod`."""

    def __init__(self, native_bf16: bool | None = None, prepack: bool | None = None) -> None:
        super().__init__(native_bf16)
        self.prepack = can_prepack_bf16() if prepack is None else prepack

    def after_load(self, layer: Linear) -> None:
        weight = _weight(layer)
        if not self.prepack or weight.dtype != torch.bfloat16 or layer.shared_weight:
            return
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.data, 1)
        layer.packed_weight = packed
        weight.data.zero_()  # a sealed model's plaintext: scrubbed before it is freed
        layer.weight = nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        packed = layer.__dict__.get("packed_weight")
        if packed is None:
            return super().apply(layer, x)
        given = x.dtype
        x = x if given == torch.bfloat16 else x.to(torch.bfloat16)  # a no-op cast still dispatches
        y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")
        return y if given == torch.bfloat16 else y.to(given)


_scratch = threading.local()  # blocks per thread and dtype: fresh ones per call cost page faults


def widened_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    compute: torch.dtype,
    out_dtype: torch.dtype,
    block_rows: int,
) -> torch.Tensor:
    """``x @ weight.T`` with the weight widened to `compute` `block_rows` rows at a time into a
    per-thread scratch block (`x` already in `compute`), each block's product stored as
    `out_dtype`: a GEMM the narrow weight type has no fast kernel for, without a widened copy
    of the whole weight."""
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=out_dtype)
    blocks: dict[torch.dtype, torch.Tensor] = _scratch.__dict__.setdefault("blocks", {})
    needed = block_rows * weight.shape[1]
    buffer = blocks.get(compute)
    if buffer is None or buffer.numel() < needed:
        buffer = blocks[compute] = scratch_tensor(needed, compute)
    block = buffer[: min(block_rows, weight.shape[0]) * weight.shape[1]].view(-1, weight.shape[1])
    for start in range(0, weight.shape[0], block_rows):
        rows = weight[start : start + block_rows]
        widened = block[: rows.shape[0]]
        widened.copy_(rows)
        out[..., start : start + rows.shape[0]] = F.linear(x, widened)
    return out


def scratch_tensor(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A buffer kept across calls: a normal tensor even when first made under inference mode
    (an inference tensor could not be written by a later call outside it)."""
    with torch.inference_mode(False):
        return torch.empty(numel, dtype=dtype)


def copy_unless_same(target: torch.Tensor, source: torch.Tensor) -> None:
    """`target.copy_(source)`, skipped when a reader already wrote `source` into `target`."""
    same = (
        source.data_ptr() == target.data_ptr()
        and source.dtype == target.dtype
        and source.shape == target.shape
        and source.stride() == target.stride()
    )
    if not same:
        target.copy_(source)


def _weight(layer: Linear) -> torch.Tensor:
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    return weight


class LinearMethodTable:
    """Chooses a `LinearMethod` per layer name; the first matching glob pattern wins.

    The table is data (later read from configuration, and so part of the measured image), not
    `if` statements scattered through the model.
    """

    def __init__(
        self, rules: Sequence[tuple[str, LinearMethod]] = (), default: LinearMethod | None = None
    ) -> None:
        self.rules = list(rules)
        self.default = default if default is not None else PlainCpuMethod()

    def method_for(self, name: str) -> LinearMethod:
        for pattern, method in self.rules:
            if fnmatch.fnmatchcase(name, pattern):
                return method
        return self.default
