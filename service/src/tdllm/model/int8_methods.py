"""The int8 methods (the overview: `tdllm.model.quantized`; their staging:
`tdllm.model.staged_quant`):

- `Int8WeightOnlyMethod`: symmetric, one scale per output row (``w ~= q * s``, ``q`` in
  -127..127), ``torch._weight_int8pack_mm``.
- `Int8DynamicMethod` (W8A8): `Int8WeightOnlyMethod`'s weights, and activations rounded to
  int8 per row on each call (not weight-only), FBGEMM's int8 GEMM; needs VNNI.
- `Int8GroupAvx2Method` (``w8a8-avx2``): int8 with a scale per 32 inputs (Q8_0's grid),
  activations rounded to int8 per 32, on our AVX2 kernel; ``quant: w4a8``'s head on a CPU
  without AVX-512.

GGUF blocks are dequantized a chunk of rows at a time and quantized as floats are (Q8_0: per row
from its blocks). `int8_weights` reads back the weights either multiplies by.

Kernel choice and fidelity: docs/performance.md, "Weight-only int8 and int4 on the TD CPU" and
"W8A8".
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import cast

import torch

from tdllm.errors import ModelLoadError
from tdllm.model import avx2_kernel, w8a8_packed
from tdllm.model.cpu_features import HAS_AMX, HAS_NATIVE_BF16
from tdllm.model.gguf_blocks import GROUP as GGUF_GROUP
from tdllm.model.gguf_blocks import GgufQuantized
from tdllm.model.int4_widen import NEVER
from tdllm.model.linear import Linear, widened_linear
from tdllm.model.staged_quant import (
    KERNEL_DTYPE,
    QUANT_BLOCK_ROWS,
    StagedQuantMethod,
    kernel_rows,
    release,
    shaped,
)
from tdllm.model.w4a8_ops import ScaleRangeError

# int8: from this many rows on, oneDNN's bf16 GEMM on widened blocks. The int8 kernel's time
# grows with every row; where oneDNN has AMX its bf16 GEMM hardly does, and widening pays from
# ~14 rows (Xeon, bundled and 1B shapes: 3.2x faster at 64 rows), elsewhere from ~128 (EPYC,
# AVX-512 bf16: the kernel 2-4x slower than bf16 from 64 rows, the widening costing the rest):
# docs/performance.md, "int8 prefill where oneDNN has AMX"; never where the CPU has no bf16
# arithmetic (an AVX2 EPYC: the kernel 13 ms at 128 rows on a 2048 x 2048 layer, widened 54)
PREFILL_MIN_ROWS = 16 if HAS_AMX else 128 if HAS_NATIVE_BF16 else NEVER
WIDEN_BLOCK_ROWS = 2048  # int8 rows widened to bf16 at a time: the block stays small and warm


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


class Int8WeightOnlyMethod(StagedQuantMethod):
    """int8 weights, one bf16 scale per output row; ``_weight_int8pack_mm`` for decode-sized
    inputs. From `PREFILL_MIN_ROWS` rows (long prefills) the int8 rows are widened to bf16 a
    block at a time instead (exact: -127..127 fit bf16's mantissa), multiplied by oneDNN's bf16
    GEMM and scaled per row: the kernel is 2-4x slower than bf16 there, the widening less (where
    the CPU has bf16 arithmetic; elsewhere the kernel at every length)."""

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
        rows = kernel_rows(x)
        if rows.shape[0] >= PREFILL_MIN_ROWS:  # exact widening, then the per-row scales
            y = widened_linear(rows, q, KERNEL_DTYPE, KERNEL_DTYPE, WIDEN_BLOCK_ROWS).mul_(scales)
        else:
            y = torch._weight_int8pack_mm(rows, q, scales)
        return shaped(y, x)


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
        # before any weight is read: a failure costs nothing. The backend's own refusal first
        # (ours names the AVX-512 flags the CPU lacks), then FBGEMM's and oneDNN's need of VNNI
        w8a8_packed.prepare(self.backend)
        if not self.vnni:
            raise ModelLoadError(
                "quant w8a8 needs a CPU with VNNI (AVX512-VNNI or AVX-VNNI); "
                "this one has none: use int8"
            )
        super().create_weights(layer, dtype)

    def staging(self, layer: Linear) -> dict[str, torch.Tensor]:
        n, k = layer.out_features, layer.in_features
        # the rows of each matrix FBGEMM packs apart (`w8a8_packed.chunk_spans`), the two
        # range columns' weights staged with them (zero), so the packing takes them as they are
        staged = {
            f"q{i}": torch.empty(stop - start, k + 2, dtype=torch.int8)
            for i, (start, stop) in enumerate(w8a8_packed.chunk_spans(n, k + 2))
        }
        # every row is written but these (no zero-fill: see `Int4WeightOnlyMethod.staging`)
        for chunk in staged.values():
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
        # exists (`release`): the load peaks at about one int8 copy of the projection and a
        # chunk or two, not two copies
        handle = w8a8_packed.pack(chunks, staged["scales"], release, layer, self.backend)
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
        return shaped(y.mul_(scale), x)


class Int8GroupAvx2Method(StagedQuantMethod):
    """int8 weights with a scale per 32 inputs (llama.cpp's Q8_0: ``w = q * s``, ``q`` in
    -127..127), times the inputs rounded to int8 per 32 on each call, on our AVX2 kernel
    (`avx2_kernel.w8a8g`): ``quant: w8a8-avx2``, and ``w4a8``'s head on a CPU without AVX-512,
    where torch's int8 kernel read the 1B shape's head at 13 GB/s and this one at 19-24
    (docs/performance.md, "Our int4 kernel on AVX2"). Q8_0 blocks arrive exactly; other rows are
    quantized per 32."""

    QUANT = "w8a8-avx2"

    def __init__(self, quant: str = QUANT) -> None:
        super().__init__()
        self.quant = quant  # the setting that chose it, for a refusal's message

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        avx2_kernel.load(self.quant)  # before any weight is read: a failure costs nothing
        if layer.in_features % GGUF_GROUP:
            raise ModelLoadError(
                f"{layer.name}: {layer.in_features} inputs are not a multiple of {GGUF_GROUP}"
            )
        super().create_weights(layer, dtype)

    # a host-chosen float weight whose scale overflows fp16 fails the load with the layer's
    # name, one line
    def load_weight(self, layer: Linear, weight: torch.Tensor, row_offset: int = 0) -> None:
        with _named(layer):
            super().load_weight(layer, weight, row_offset)

    def load_blocks(self, layer: Linear, blocks: GgufQuantized, row_offset: int = 0) -> None:
        with _named(layer):
            super().load_blocks(layer, blocks, row_offset)

    def staging(self, layer: Linear) -> dict[str, torch.Tensor]:
        # the kernel's layout itself: rows are packed as they arrive (`_put`), so the load
        # holds no staged copy of the whole (the 1B head's would be 262 MB beside its packing)
        return {"packed": avx2_kernel.empty8(layer.out_features, layer.in_features)}

    def stage_floats(self, staged: dict[str, torch.Tensor], start: int, rows: torch.Tensor) -> None:
        groups = rows.float().reshape(rows.shape[0], -1, GGUF_GROUP)
        s = groups.abs().amax(-1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        q = torch.round(groups / s[..., None]).clamp(-127, 127).reshape(rows.shape)
        self._put(staged, start, q.to(torch.int8), s)

    def stage_blocks(
        self, staged: dict[str, torch.Tensor], start: int, rows: GgufQuantized
    ) -> None:
        if rows.kind != "Q8_0":
            self.stage_floats(staged, start, rows.dequantize())
            return
        codes, scale, _ = rows.affine()  # Q8_0: w = d * q, its own grid
        self._put(staged, start, torch.from_numpy(codes), torch.from_numpy(scale))

    def _put(
        self, staged: dict[str, torch.Tensor], start: int, q: torch.Tensor, scales: torch.Tensor
    ) -> None:
        avx2_kernel.pack8_into(staged["packed"], start, q, scales)  # w = q * s

    def pack(self, layer: Linear, staged: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        layer.register_buffer("qweight", staged["packed"], persistent=False)
        return [staged["packed"]]

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        packed = layer.qweight
        assert isinstance(packed, torch.Tensor)
        return avx2_kernel.w8a8g(x, packed, layer.out_features, layer.in_features)

    def holds_exactly(self, kind: str) -> bool:
        return kind == "Q8_0"  # its codes and fp16 scales as they are (`stage_blocks`)

    def rows(self, layer: Linear, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the weight as fp32 (`head_embedding.HeadEmbedding`: a tied embedding)."""
        packed = layer.qweight
        assert isinstance(packed, torch.Tensor)
        return avx2_kernel.rows8(packed, rows, layer.out_features, layer.in_features)


@contextlib.contextmanager
def _named(layer: Linear) -> Iterator[None]:
    try:
        yield
    except ScaleRangeError as error:
        raise ModelLoadError(f"{layer.name}: {error}") from error


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
