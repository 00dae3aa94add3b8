"""Quantized projections on the TD CPU: the weights stay int8 (or int4) in memory and
PyTorch's own CPU kernels multiply by them directly, so a decode step reads a half (a quarter) of
the bytes of bf16 from DRAM. Activations stay in the model's dtype (fp32 or bf16) everywhere
else; these kernels take them in bf16 (`KERNEL_DTYPE`: with fp32 operands both fall back to
scalar code, 10-40x slower on this torch build), so an fp32 model rounds each projection's input
to bf16 and widens its output back (bf16 products, fp32 accumulation inside the kernel).

- `Int8WeightOnlyMethod`: symmetric, one scale per output row (``w ~= q * s``, ``q`` in
  -127..127), ``torch._weight_int8pack_mm``.
- `Int4WeightOnlyMethod`: asymmetric, a scale and a zero per group of `group_size` inputs of each
  row (``w ~= (q - 8) * s + z``, ``q`` in 0..15), ``torch._weight_int4pack_mm_for_cpu``.
- `Int8DynamicMethod` (W8A8): `Int8WeightOnlyMethod`'s weights, and activations rounded to
  int8 per row on each call (not weight-only), FBGEMM's int8 GEMM; needs VNNI.
- `Int4Avx512Method` (``w4a8-avx512``): `Int4WeightOnlyMethod`'s codes, scales and zeros, and
  activations rounded to int8 per 32 inputs on each call, on our AVX-512 VNNI kernel.

Each method stages a projection's rows already quantized, in the layout its kernel's packing
takes, as they arrive (fused q|k|v and gate|up come one shard at a time, at their row offsets),
and packs the projection the moment its last row is in. Rows arrive as floats (quantized here,
`QUANT_BLOCK_ROWS` at a time) or as GGUF blocks (`GgufQuantized`, `load_blocks`): Q4_0, Q4_1 and
Q4_K are int4 g32's own grid (``w = d * q + m = (q - 8) * d + (m + 8 d)``), taken by the int4
method as they are, scales and zeros rounded to bf16 as the kernel takes them; any other type is
dequantized a chunk of rows at a time and quantized as floats are (Q8_0 for int8: per row from
its blocks). A method never holds a float copy of a projection: the only one is what a reader
hands over (none for GGUF blocks).
A sealed reader never decrypts into a quantized buffer (`Transformer.weight_destinations`
names plain weights only): its plaintext arrives through `load_weight` like any checkpoint's.
Staged rows are buffers, so a failed load's scrub (`loader._zero`) reaches them too.

Kernel choice and fidelity: docs/performance.md, "Weight-only int8 on the TD CPU", "GGUF
blocks straight into the int kernels" and "W8A8".
"""

from __future__ import annotations

import itertools
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import cast

import numpy as np
import torch

from tdllm.errors import ModelLoadError
from tdllm.model import avx512_kernel, w8a8_packed
from tdllm.model.cpu_features import HAS_AMX
from tdllm.model.gguf_blocks import GROUP as GGUF_GROUP
from tdllm.model.gguf_blocks import INT4_KINDS, GgufQuantized
from tdllm.model.int4_widen import int4_widened_linear, pack_codes, prefill_min_rows
from tdllm.model.linear import (
    Linear,
    LinearMethod,
    LinearMethodTable,
    PrepackedCpuMethod,
    TdCpuKernels,
    widened_linear,
)
from tdllm.model.quant_formats import QUANTS, W8A8_BACKENDS

KERNEL_DTYPE = torch.bfloat16  # of the activations and scales the kernels are given
# int8: from this many rows on, oneDNN's bf16 GEMM on widened blocks. The int8 kernel's time
# grows with every row; where oneDNN has AMX its bf16 GEMM hardly does, and widening pays from
# ~14 rows (Xeon, bundled and 1B shapes: 3.2x faster at 64 rows), elsewhere from ~128 (EPYC,
# AVX-512 bf16: the kernel 2-4x slower than bf16 from 64 rows, the widening costing the rest):
# docs/performance.md, "int8 prefill where oneDNN has AMX"
PREFILL_MIN_ROWS = 16 if HAS_AMX else 128
WIDEN_BLOCK_ROWS = 2048  # int8 rows widened to bf16 at a time: the block stays small and warm
QUANT_BLOCK_ROWS = 256  # rows quantized at a time: temporaries under glibc's mmap threshold
INT4_GROUP_SIZE = 32
INT4_ROW_MULTIPLE = 16  # the int4 packing takes a multiple of 16 output rows: zero rows pad it


def int8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(q [N, K] int8, scales [N] fp32)`` with ``weight ~= q * s``;
    the error of each entry is at most ``s / 2`` (``s = max|row| / 127``)."""
    n = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, QUANT_BLOCK_ROWS):
        rows = weight[start : start + QUANT_BLOCK_ROWS].float()
        s = rows.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        q[start : start + rows.shape[0]] = torch.round(rows / s[:, None]).clamp(-127, 127)
        scales[start : start + rows.shape[0]] = s
    return q, scales


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


class _StagedQuantMethod(TdCpuKernels, ABC):
    """Stage each projection's rows already quantized, in the layout the kernel's packing takes,
    as they arrive (float rows or GGUF blocks, a shard at a time, at any row offset); pack when
    the last row is in (see the module doc). The staged buffers are registered on the layer
    (``staged_*``) so a failed load's scrub reaches them, and are zeroed once packed."""

    def __init__(self) -> None:
        self._rows_in: weakref.WeakKeyDictionary[Linear, int] = weakref.WeakKeyDictionary()

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        self._rows_in[layer] = 0  # the staged buffers are allocated by a first shard

    def load_weight(self, layer: Linear, weight: torch.Tensor, row_offset: int = 0) -> None:
        def fill(staged: dict[str, torch.Tensor], start: int, stop: int) -> None:
            chunk = weight[start - row_offset : stop - row_offset]
            self.stage_floats(staged, start, chunk)

        self._take(layer, row_offset, weight.shape[0], fill)

    def load_blocks(self, layer: Linear, blocks: GgufQuantized, row_offset: int = 0) -> None:
        """GGUF blocks straight in (`tdllm.model.gguf_blocks`): see `stage_blocks`."""
        if blocks.cols != layer.in_features:
            raise ValueError(
                f"{layer.name}: {blocks.kind} rows of {blocks.cols} inputs, "
                f"expected {layer.in_features}"
            )

        def fill(staged: dict[str, torch.Tensor], start: int, stop: int) -> None:
            part = blocks.row_slice(start - row_offset, stop - row_offset)
            self.stage_blocks(staged, start, part)
            blocks.taken(start - row_offset, stop - row_offset)

        self._take(layer, row_offset, blocks.rows, fill)

    def _take(
        self,
        layer: Linear,
        row_offset: int,
        rows: int,
        fill: Callable[[dict[str, torch.Tensor], int, int], None],
    ) -> None:
        if _quantized(layer):
            raise ValueError(f"{layer.name}: weight loaded after the projection was quantized")
        if row_offset < 0 or row_offset + rows > layer.out_features:
            raise ValueError(
                f"{layer.name}: rows {row_offset}:{row_offset + rows} of {layer.out_features}"
            )
        staged = {
            name: buffer
            for name, buffer in layer._buffers.items()
            if name.startswith("staged_") and buffer is not None
        }
        if not staged:
            for name, buffer in self.staging(layer).items():
                layer.register_buffer(f"staged_{name}", buffer, persistent=False)
                staged[f"staged_{name}"] = buffer
        tensors = {name.removeprefix("staged_"): buffer for name, buffer in staged.items()}
        for start in range(row_offset, row_offset + rows, QUANT_BLOCK_ROWS):
            fill(tensors, start, min(start + QUANT_BLOCK_ROWS, row_offset + rows))
        self._rows_in[layer] += rows
        if self._rows_in[layer] == layer.out_features:
            kept = self.pack(layer, tensors)
            for name, buffer in staged.items():
                layer.register_buffer(name, None, persistent=False)
                released = buffer.untyped_storage().nbytes() == 0  # by `pack` (`_release`)
                if not released and not any(buffer is k for k in kept):
                    buffer.zero_()  # plaintext of a sealed model: scrubbed, not just freed

    def after_load(self, layer: Linear) -> None:
        if not _quantized(layer):  # the loader checks coverage; this is belt and braces
            rows = self._rows_in.get(layer, 0)
            raise ValueError(f"{layer.name}: {rows} of {layer.out_features} rows")

    @abstractmethod
    def staging(self, layer: Linear) -> dict[str, torch.Tensor]:
        """Fresh staging buffers for `layer`'s quantized rows, by name."""

    @abstractmethod
    def stage_floats(self, staged: dict[str, torch.Tensor], start: int, rows: torch.Tensor) -> None:
        """Quantize float `rows` into the staged rows from `start` on."""

    @abstractmethod
    def stage_blocks(
        self, staged: dict[str, torch.Tensor], start: int, rows: GgufQuantized
    ) -> None:
        """Put GGUF `rows` into the staged rows from `start` on."""

    @abstractmethod
    def pack(self, layer: Linear, staged: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Every row is staged: register the layer's kernel buffers (``qweight`` and its scales);
        return the staged tensors they adopted as they are (the rest are scrubbed, unless
        `pack` scrubbed and freed one itself: `_release`)."""


def _release(tensor: torch.Tensor) -> None:
    """Scrub `tensor` and free its memory now, though references to it remain (a staged
    buffer `_take` still holds): its storage shrinks to nothing."""
    tensor.zero_()
    tensor.untyped_storage().resize_(0)


def _quantized(layer: Linear) -> bool:
    return layer._buffers.get("qweight") is not None or "w8a8_handle" in layer.__dict__


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x[..., K]`` as the kernels take it: 2-D, contiguous, `KERNEL_DTYPE`. (Each cast and
    reshape only where needed: a no-op still costs a dispatch, ~120 per decode step.)"""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    rows = rows if rows.dtype == KERNEL_DTYPE else rows.to(KERNEL_DTYPE)
    return rows.contiguous()


def _shaped(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A kernel's ``[M, N]`` output in `x`'s leading shape and dtype."""
    y = y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
    return y if y.dtype == x.dtype else y.to(x.dtype)


class Int8WeightOnlyMethod(_StagedQuantMethod):
    """int8 weights, one bf16 scale per output row; ``_weight_int8pack_mm`` for decode-sized
    inputs. From `PREFILL_MIN_ROWS` rows (long prefills) the int8 rows are widened to bf16 a
    block at a time instead (exact: -127..127 fit bf16's mantissa), multiplied by oneDNN's bf16
    GEMM and scaled per row: the kernel is 2-4x slower than bf16 there, the widening less."""

    def staging(self, layer: Linear) -> dict[str, torch.Tensor]:
        n, k = layer.out_features, layer.in_features
        return {"q": torch.empty(n, k, dtype=torch.int8), "scales": torch.empty(n)}

    def stage_floats(self, staged: dict[str, torch.Tensor], start: int, rows: torch.Tensor) -> None:
        q, scales = int8_quantize(rows)
        staged["q"][start : start + rows.shape[0]] = q
        staged["scales"][start : start + rows.shape[0]] = scales

    def stage_blocks(
        self, staged: dict[str, torch.Tensor], start: int, rows: GgufQuantized
    ) -> None:
        # Q8_0's 32-weight blocks each have their own scale, the kernel one per row: the rows
        # are requantized per row from the blocks, a chunk at a time (no fp32 copy of the
        # whole weight). Measured: running Q8_0 as-is (int8 widened per block, times its
        # scale, bf16 GEMM) is 4.6x slower on the head at one row (docs/performance.md).
        self.stage_floats(staged, start, rows.dequantize())

    def pack(self, layer: Linear, staged: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        layer.register_buffer("qweight", staged["q"], persistent=False)
        layer.register_buffer("scales", staged["scales"].to(KERNEL_DTYPE), persistent=False)
        return [staged["q"]]

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        q, scales = layer.qweight, layer.scales
        assert isinstance(q, torch.Tensor) and isinstance(scales, torch.Tensor)
        rows = _rows(x)
        if rows.shape[0] >= PREFILL_MIN_ROWS:  # exact widening, then the per-row scales
            y = widened_linear(rows, q, KERNEL_DTYPE, KERNEL_DTYPE, WIDEN_BLOCK_ROWS).mul_(scales)
        else:
            y = torch._weight_int8pack_mm(rows, q, scales)
        return _shaped(y, x)


class Int8DynamicMethod(Int8WeightOnlyMethod):
    """W8A8: the int8 weights of `Int8WeightOnlyMethod` (same rows, same per-row scales) and
    activations rounded to 8 bits per row on each call, multiplied by an int8 GEMM (u8 x s8
    products summed in int32): FBGEMM's (``quantized::linear_dynamic``, VNNI) by default, or
    oneDNN's (`backend`; `tdllm.model.w8a8_packed` has both). It reads the
    int8 weights near the memory bus at one row and keeps that speed to 8 rows, where
    ``_weight_int8pack_mm`` does not, and its prefill beats oneDNN's bf16 GEMM
    (docs/performance.md, "W8A8"). The cost is the activations' rounding: a step of
    ``max|row| / 127`` per entry, so a row with an outlier loses the precision of the rest.

    FBGEMM picks one quantization range per call, from the whole input: rows in a batch would
    round each other's activations (a result that depends on the batch, and a channel from one
    request's values into another's). So each row is scaled to ``max|row| = LIMIT`` and two
    input columns of +1 and -1 against zero weights are appended: the range of every call is
    exactly [-1, 1], and each row is rounded on its own symmetric grid of 127 steps a side,
    whatever else is in the batch (tested: a row alone = the row in any batch).

    The backend's packed copy of the weights, in chunks of rows for a large projection, lives
    in `tdllm.model.w8a8_packed` (freed with the layer, not reached by a failed load's scrub);
    oneDNN takes the same scaled rows and rounds them to the same grid."""

    # |row| after scaling: 127 of the 127.5 steps FBGEMM's [-1, 1] grid has above its zero
    # point (2/255 a step, zero point 128), so +-LIMIT land on whole steps
    LIMIT = 127 / 127.5

    def __init__(self, vnni: bool | None = None, backend: str | None = None) -> None:
        super().__init__()
        # without VNNI, FBGEMM's u8 x s8 pairs are summed in int16 and saturate on full-range
        # activations (PyTorch's observers then use 7 bits): refused rather than run wrong
        self.vnni = torch.cpu._is_vnni_supported() if vnni is None else vnni
        # the int8 GEMM, "fbgemm", "onednn" or "avx512" (`w8a8_packed`; None: its default)
        self.backend = w8a8_packed.default_backend() if backend is None else backend

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        if not self.vnni:
            raise ModelLoadError(
                "quant w8a8 needs a CPU with VNNI (AVX512-VNNI or AVX-VNNI); "
                "this one has none: use int8"
            )
        w8a8_packed.prepare(self.backend)  # before any weight is read: a failure costs nothing
        super().create_weights(layer, dtype)

    def staging(self, layer: Linear) -> dict[str, torch.Tensor]:
        n, k = layer.out_features, layer.in_features
        # the rows of each matrix FBGEMM packs apart (`w8a8_packed.chunk_spans`), the two
        # range columns' weights staged with them (zero), so the packing takes them as they are
        staged = {
            f"q{i}": torch.empty(stop - start, k + 2, dtype=torch.int8)
            for i, (start, stop) in enumerate(w8a8_packed.chunk_spans(n, k + 2))
        }
        for chunk in staged.values():  # every row is written but these (no zero-fill: see int4)
            chunk[:, k:] = 0
        return {**staged, "scales": torch.empty(n)}

    def stage_floats(self, staged: dict[str, torch.Tensor], start: int, rows: torch.Tensor) -> None:
        q, scales = int8_quantize(rows)
        stop = start + rows.shape[0]
        staged["scales"][start:stop] = scales
        first = 0  # the first row of chunk i
        for i in itertools.count():
            chunk = staged.get(f"q{i}")
            if chunk is None or first >= stop:
                break
            lo, hi = max(start, first), min(stop, first + chunk.shape[0])
            if lo < hi:
                chunk[lo - first : hi - first, : rows.shape[1]] = q[lo - start : hi - start]
            first += chunk.shape[0]

    def pack(self, layer: Linear, staged: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        chunks = [staged[f"q{i}"] for i in range(len(staged) - 1)]
        # each chunk's staged rows are scrubbed and freed once FBGEMM's input copy of them
        # exists (`_release`): the load peaks at about one int8 copy of the projection and a
        # chunk or two, not two copies
        handle = w8a8_packed.pack(chunks, staged["scales"], _release, layer, self.backend)
        layer.__dict__["w8a8_handle"] = handle
        return []

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        m, k = rows.shape
        # each row over its own max|row| / LIMIT; a zero row stays zero (tiny, not 0/0)
        scale = torch.linalg.vector_norm(rows, _INF, dim=1, keepdim=True, dtype=torch.float32)
        scale.clamp_(min=torch.finfo(torch.float32).tiny).mul_(1 / self.LIMIT)
        handle = cast(int, layer.w8a8_handle)
        if torch.compiler.is_compiling():  # FBGEMM's packed weights are opaque to a graph
            scaled = torch.cat([rows / scale, _RANGE.expand(m, 2)], dim=1)
            y = torch.ops.tdllm.w8a8_linear(scaled, handle, layer.out_features)
        else:  # the same values, written in place: ~10 us less per call at one row
            scaled = torch.empty(m, k + 2)
            torch.div(rows, scale, out=scaled[:, :k])
            scaled[:, k:] = _RANGE
            y = w8a8_packed.product(scaled, handle)
        return _shaped(y.mul_(scale), x)


def int8_weights(layer: Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [N, K] int8, scales [N] fp32)`` an int8 or W8A8 projection multiplies by (W8A8's
    read back from the packed matrices, less the range columns): for checks and audits."""
    handle = layer.__dict__.get("w8a8_handle")
    if handle is None:
        q, scales = layer.qweight, layer.scales
        assert isinstance(q, torch.Tensor) and isinstance(scales, torch.Tensor)
        return q, scales.float()
    q, scales = w8a8_packed.unpack(handle)
    return q[:, : layer.in_features].clone(), scales.float()


_RANGE = torch.tensor([[1.0, -1.0]])  # the two range columns of every W8A8 input row
_INF = float("inf")


class Int4WeightOnlyMethod(_StagedQuantMethod):
    """int4 weights, a scale and zero per `group_size` inputs; ``_weight_int4pack_mm_for_cpu``
    for decode-sized inputs. From `int4_widen.prefill_min_rows` rows (long prefills) the
    kernel's own weights, dequantized from its packed codes a block of rows at a time and
    rounded to bf16, go through oneDNN's bf16 GEMM instead: the kernel falls 2-3x behind bf16
    there."""

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
        rows = _rows(x)
        if rows.shape[0] >= prefill_min_rows(layer.in_features, layer.out_features):
            y = int4_widened_linear(rows, packed, sz, self.group_size, layer.out_features)
        else:
            y = torch._weight_int4pack_mm_for_cpu(rows, packed, self.group_size, sz)
        if y.shape[-1] != layer.out_features:  # rows padded to INT4_ROW_MULTIPLE
            y = y[:, : layer.out_features]
        return _shaped(y, x)


class Int4Avx512Method(Int4WeightOnlyMethod):
    """W4A8 on our AVX-512 VNNI kernel (`tdllm.model.avx512_kernel`, ``quant: w4a8-avx512``):
    int4's codes, scales and zeros (the same rows from floats or GGUF blocks), packed as the
    kernel streams them (scales and offsets ``z - 8 s`` in fp16: Q4_0's and Q4_1's own
    precision), times the inputs rounded to int8 per 32 on each call (``max|x| / 127`` a step:
    llama.cpp's Q8_0 activations). Not weight-only: the rounding of each input group is the
    cost, measured by ``tdllm bench fidelity``. Against ``_weight_int4pack_mm_for_cpu`` the
    kernel is 1.1-1.8x at one row on the 1B shapes, 1.1-2.2x at 8 rows, 2.3-5.5x at 64. From
    `avx512_kernel.W4A8_WIDEN_MIN_ROWS` rows (where oneDNN has AMX) the weights are widened to
    bf16 a block at a time for oneDNN's GEMM instead, the inputs rounded to bf16
    (docs/performance.md, "Our own int4 kernel")."""

    QUANT = "w4a8-avx512"

    def __init__(self) -> None:
        super().__init__(avx512_kernel.GROUP)

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        avx512_kernel.load(self.QUANT)  # before any weight is read: a failure costs nothing
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
            packed = avx512_kernel.pack4(staged["codes"], staged["scales"], offsets)
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
        rows = x.reshape(-1, k)
        if 0 < avx512_kernel.W4A8_WIDEN_MIN_ROWS <= rows.shape[0]:  # a prompt, on AMX
            return _shaped(avx512_kernel.w4a8_widened(rows, packed, n, k), x)
        rows = (rows if rows.dtype == torch.float32 else rows.float()).contiguous()
        return _shaped(avx512_kernel.w4a8(rows, packed, n, k), x)


def quant_table(quant: str) -> LinearMethodTable:
    """The methods of every projection for a ``quant`` setting. int4 keeps the lm_head int8
    (as llama.cpp's Q4 mixes keep their output tensor wider): the bundled model's tied head
    loses 9% of its norm to int4 g32 against 1.2% to int8, and it dominated int4's perplexity.
    That head is W8A8: FBGEMM reads it 1.5-2x faster than ``_weight_int8pack_mm``, at the
    same perplexity (measured). w8a8 keeps q|k|v weight-only: their input (the attention
    norm's output) has the outliers; rounded per row it alone cost +2.2% perplexity, every
    other projection under +0.2% (docs/performance.md, "W8A8"); w8a8-onednn likewise."""
    if quant == "int4":
        return LinearMethodTable([("lm_head", Int8DynamicMethod())], Int4WeightOnlyMethod())
    if quant == Int4Avx512Method.QUANT:  # the head W8A8 on the same library's kernel
        return LinearMethodTable(
            [("lm_head", Int8DynamicMethod(backend="avx512"))], Int4Avx512Method()
        )
    if quant in W8A8_BACKENDS:
        return LinearMethodTable([("*.qkv_proj", Int8WeightOnlyMethod())], quant_method(quant))
    # "none": the plain kernels, bf16 weights prepacked for oneDNN where that is faster
    return LinearMethodTable(default=quant_method(quant) or PrepackedCpuMethod())


def quant_method(quant: str) -> LinearMethod | None:
    """The method for a ``quant`` setting ("none": None, the plain kernels)."""
    if quant == "int8":
        return Int8WeightOnlyMethod()
    if quant == "int4":
        return Int4WeightOnlyMethod()
    if quant == Int4Avx512Method.QUANT:
        return Int4Avx512Method()
    if quant in W8A8_BACKENDS:
        return Int8DynamicMethod(backend=W8A8_BACKENDS[quant])
    if quant != "none":
        raise ValueError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")
    return None
