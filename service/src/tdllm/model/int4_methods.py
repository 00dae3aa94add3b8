"""The int4 methods (the overview: `tdllm.model.quantized`; their staging:
`tdllm.model.staged_quant`):

- `Int4WeightOnlyMethod`: asymmetric, a scale and a zero per group of `group_size` inputs of each
  row (``w ~= (q - 8) * s + z``, ``q`` in 0..15), ``torch._weight_int4pack_mm_for_cpu``.
- `Int4W4A8Method` (``w4a8``): `Int4WeightOnlyMethod`'s codes, scales and zeros, and activations
  rounded to int8 per 32 inputs on each call, on our kernel: AVX-512 VNNI where the CPU has it,
  else AVX2 (the same bits). `Int4Avx512Method` (``w4a8-avx512``): on the AVX-512 one only.

GGUF blocks: Q4_0, Q4_1 and Q4_K are int4 g32's own grid
(``w = d * q + m = (q - 8) * d + (m + 8 d)``), taken by the int4 methods as they are (by
`Int4WeightOnlyMethod` with its scales and zeros rounded to bf16, as its kernel takes them); any
other type is dequantized a chunk of rows at a time and quantized as floats are.

Kernel choice and fidelity: docs/performance.md, "Weight-only int8 and int4 on the TD CPU" and "GGUF
blocks straight into the int kernels".
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from tdllm.errors import ModelLoadError
from tdllm.model import avx2_kernel, avx512_kernel
from tdllm.model.gguf_blocks import GROUP as GGUF_GROUP
from tdllm.model.gguf_blocks import INT4_KINDS, GgufQuantized
from tdllm.model.int4_widen import int4_widened_linear, pack_codes, prefill_min_rows
from tdllm.model.linear import Linear
from tdllm.model.staged_quant import (
    KERNEL_DTYPE,
    QUANT_BLOCK_ROWS,
    StagedQuantMethod,
    kernel_rows,
    shaped,
)

INT4_GROUP_SIZE = 32
INT4_ROW_MULTIPLE = 16  # the int4 packing takes a multiple of 16 output rows: zero rows pad it


def int4_quantize(
    weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` inputs: ``(q [N, K] int32 in 0..15,
    scales [N, K/g], zeros [N, K/g])`` with ``weight ~= (q - 8) * s + z``, error <= ``s / 2``."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4: {k} inputs are not a multiple of the group size {group_size}")
    q = torch.empty(n, k, dtype=torch.int32)
    scales = torch.empty(n, k // group_size)
    zeros = torch.empty(n, k // group_size)
    for start in range(0, n, QUANT_BLOCK_ROWS):
        rows = weight[start : start + QUANT_BLOCK_ROWS].float()
        groups = rows.reshape(rows.shape[0], -1, group_size)
        lo, hi = groups.amin(-1), groups.amax(-1)
        s = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        codes = torch.round((groups - lo[..., None]) / s[..., None]).clamp(0, 15)
        end = start + rows.shape[0]
        q[start:end] = codes.reshape(rows.shape).to(torch.int32)
        scales[start:end], zeros[start:end] = s, lo + 8 * s
    return q, scales, zeros


def int4_pack(
    weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """`int4_quantize` in the layout ``_weight_int4pack_mm_for_cpu`` reads: packed codes
    ``[N', K/2]`` uint8 and scales-and-zeros ``[K/g, N', 2]`` (fp32; cast to the kernel's dtype
    before use), N' = N rounded up to `INT4_ROW_MULTIPLE` (the padding rows are zero)."""
    pad = -weight.shape[0] % INT4_ROW_MULTIPLE
    if pad:
        weight = torch.cat([weight, weight.new_zeros(pad, weight.shape[1])])
    q, scales, zeros = int4_quantize(weight, group_size)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    return packed, torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()


class Int4WeightOnlyMethod(StagedQuantMethod):
    """int4 weights, a scale and zero per `group_size` inputs; ``_weight_int4pack_mm_for_cpu``
    for decode-sized inputs. From `int4_widen.prefill_min_rows` rows (long prefills) the
    kernel's own weights, dequantized from its packed codes a block of rows at a time and
    rounded to bf16, go through oneDNN's bf16 GEMM instead: the kernel falls 2-3x behind bf16
    there (where the CPU has bf16 arithmetic; elsewhere the kernel at every length)."""

    def __init__(self, group_size: int = INT4_GROUP_SIZE) -> None:
        super().__init__()
        self.group_size = group_size

    def groups(self, layer: Linear) -> int:
        """`layer`'s groups of inputs a row (ValueError unless they divide its inputs)."""
        k = layer.in_features
        if k % self.group_size:
            raise ValueError(
                f"{layer.name}: {k} inputs are not a multiple of the group size {self.group_size}"
            )
        return k // self.group_size

    def staging(self, layer: Linear) -> dict[str, torch.Tensor]:
        n = layer.out_features + -layer.out_features % INT4_ROW_MULTIPLE  # padding rows: zero
        k, groups = layer.in_features, self.groups(layer)
        # kept memory (packed codes, bf16 scales and zeros) is allocated first, the codes'
        # staging after it: freed, the staging leaves no hole under kept memory (glibc
        # kept such holes: +130 MiB RSS in one load of three, measured). Not zero-filled: every
        # real row is written once (`_take` counts them) and `pack` writes all of `packed`; only
        # the padding rows are zeroed (zero-filling them all cost 8 of an 8B load's 34 s)
        out = layer.out_features
        staged = {
            "packed": torch.empty(n, k // 2, dtype=torch.uint8),
            "scales_zeros": torch.empty(groups, n, 2, dtype=KERNEL_DTYPE),
            "codes": torch.empty(n, k, dtype=torch.uint8),
        }
        staged["scales_zeros"][:, out:] = 0
        staged["codes"][out:] = 0
        return staged

    def stage_floats(self, staged: dict[str, torch.Tensor], start: int, rows: torch.Tensor) -> None:
        q, scales, zeros = int4_quantize(rows, self.group_size)
        self._put(staged, start, q, scales, zeros)

    def stage_blocks(
        self, staged: dict[str, torch.Tensor], start: int, rows: GgufQuantized
    ) -> None:
        if rows.kind not in INT4_KINDS or self.group_size != GGUF_GROUP:
            self.stage_floats(staged, start, rows.dequantize())  # e.g. Q8_0, Q6_K: requantized
            return
        # the GGUF's own grid: w = scale * q + offset = (q - 8) * scale + (offset + 8 * scale)
        codes, scale, offset = rows.affine()
        assert offset is not None
        zeros = offset + np.float32(8) * scale
        self._put(staged, start, *(torch.from_numpy(a) for a in (codes, scale, zeros)))

    def _put(
        self,
        staged: dict[str, torch.Tensor],
        start: int,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
    ) -> None:
        stop = start + codes.shape[0]
        staged["codes"][start:stop] = codes
        self._put_scales(staged, start, stop, scales, zeros)

    def _put_scales(
        self,
        staged: dict[str, torch.Tensor],
        start: int,
        stop: int,
        scales: torch.Tensor,
        zeros: torch.Tensor,
    ) -> None:
        sz = staged["scales_zeros"]  # [groups, rows, (scale, zero)], rounded to bf16 here
        sz[:, start:stop, 0], sz[:, start:stop, 1] = scales.T, zeros.T

    def pack(self, layer: Linear, staged: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        packed = staged["packed"]
        pack_codes(staged["codes"], packed)  # the staged codes are scrubbed after, as unkept
        layer.register_buffer("qweight", packed, persistent=False)
        layer.register_buffer("scales_zeros", staged["scales_zeros"], persistent=False)
        return [packed, staged["scales_zeros"]]

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        packed, sz = layer.qweight, layer.scales_zeros
        assert isinstance(packed, torch.Tensor) and isinstance(sz, torch.Tensor)
        rows = kernel_rows(x)
        if rows.shape[0] >= prefill_min_rows(layer.in_features, layer.out_features):
            y = int4_widened_linear(rows, packed, sz, self.group_size, layer.out_features)
        else:
            y = torch._weight_int4pack_mm_for_cpu(rows, packed, self.group_size, sz)
        if y.shape[-1] != layer.out_features:  # rows padded to INT4_ROW_MULTIPLE
            y = y[:, : layer.out_features]
        return shaped(y, x)


class W4A8Kernel(Protocol):
    """What `Int4W4A8Method` needs of a kernel module (`avx512_kernel`, `avx2_kernel`)."""

    def load(self, quant: str) -> None: ...

    def pack4(
        self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor: ...

    def w4a8(self, x: torch.Tensor, packed: torch.Tensor, n: int, k: int) -> torch.Tensor: ...


def w4a8_kernel() -> W4A8Kernel:
    """The int4 kernel for this CPU: AVX-512 VNNI where it has it, else AVX2."""
    return avx2_kernel if avx512_kernel.missing_cpu_flags() else avx512_kernel


class Int4W4A8Method(Int4WeightOnlyMethod):
    """W4A8 on our kernel (``quant: w4a8``; `kernel`: AVX-512 VNNI where the CPU has it, else
    AVX2, `w4a8_kernel`): int4's codes, scales and zeros (the same rows from floats or GGUF
    blocks), packed as the kernel streams them (scales and offsets ``z - 8 s`` in fp16: Q4_0's
    and Q4_1's own precision; the AVX2 kernel holds Q4_0's without its offsets, each ``-8 s``:
    `avx2_kernel.pack4`), times the inputs rounded to int8 per 32 on each call (``max|x| /
    127`` a step: llama.cpp's Q8_0 activations). Not weight-only: the rounding of each input
    group is the cost, measured by ``tdllm bench fidelity``. Both kernels give the same bits.
    Against ``_weight_int4pack_mm_for_cpu`` the AVX-512 kernel is 1.1-1.8x at one row on the 1B
    shapes, 1.1-2.2x at 8 rows, 2.3-5.5x at 64; the AVX2 one 2.6-2.9x at one row and 3.0-3.1x at
    8 on an AVX2 EPYC (`tdllm bench linear-kernels`).
    From `avx512_kernel.W4A8_WIDEN_MIN_ROWS` rows (where oneDNN has AMX) the weights are widened
    to bf16 a block at a time for oneDNN's GEMM instead, the inputs rounded to bf16
    (docs/performance.md, "Our own int4 kernel", "Our int4 kernel on AVX2")."""

    QUANT = "w4a8"

    def __init__(self, kernel: W4A8Kernel | None = None) -> None:
        super().__init__(avx512_kernel.GROUP)
        self.kernel = w4a8_kernel() if kernel is None else kernel

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        self.kernel.load(self.QUANT)  # before any weight is read: a failure costs nothing
        super().create_weights(layer, dtype)

    def staging(self, layer: Linear) -> dict[str, torch.Tensor]:
        n, k, groups = layer.out_features, layer.in_features, self.groups(layer)
        return {
            "codes": torch.empty(n, k, dtype=torch.uint8),
            "scales": torch.empty(n, groups),
            "zeros": torch.empty(n, groups),
        }

    def _put_scales(
        self,
        staged: dict[str, torch.Tensor],
        start: int,
        stop: int,
        scales: torch.Tensor,
        zeros: torch.Tensor,
    ) -> None:
        staged["scales"][start:stop], staged["zeros"][start:stop] = scales, zeros

    def pack(self, layer: Linear, staged: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # w = (q - 8) * s + z = q * s + (z - 8 s): the offset the kernel adds per input group
        # (one temporary, scrubbed below: a sealed model's parameters)
        offsets = staged["scales"].mul(-8).add_(staged["zeros"])
        try:
            packed = self.kernel.pack4(staged["codes"], staged["scales"], offsets)
        except ValueError as error:
            raise ModelLoadError(f"{layer.name}: {error}") from error
        finally:
            offsets.zero_()
        layer.register_buffer("qweight", packed, persistent=False)
        return []

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        packed = layer.qweight
        assert isinstance(packed, torch.Tensor)
        n, k = layer.out_features, layer.in_features
        if self.kernel is avx512_kernel and 0 < avx512_kernel.W4A8_WIDEN_MIN_ROWS <= x.numel() // k:
            # a prompt, on AMX
            return shaped(avx512_kernel.w4a8_widened(x.reshape(-1, k), packed, n, k), x)
        # fp32 or bf16 (a model's dtypes) in any shape: no reshape or cast around the call
        return self.kernel.w4a8(x, packed, n, k)


class Int4Avx512Method(Int4W4A8Method):
    """`Int4W4A8Method` on the AVX-512 VNNI kernel only (``quant: w4a8-avx512``: refused, with
    what to use instead, on a CPU without it)."""

    QUANT = "w4a8-avx512"

    def __init__(self) -> None:
        super().__init__(avx512_kernel)
