"""int4 prefill on oneDNN's bf16 GEMM: the weights of ``torch._weight_int4pack_mm_for_cpu``,
dequantized from its packed layout a block of output rows at a time (issue 15, item 2).

The int4 kernel reads half a byte a weight, which makes decode fast, but it falls 2-3x behind
bf16 from a few dozen rows on (docs/performance.md, "Weight-only int8 and int4 on the TD CPU").
For long prefills `int4_widened_linear` instead unpacks a block of rows' codes straight from
the packed tensor the kernel keeps (no second copy of the codes: they would cost twice the packed
bytes), dequantizes them as the kernel does, ``(q - 8) * s + z`` in fp32 with ``s`` and ``z``
the bf16 values the kernel is given, rounds them to bf16 and multiplies with ``torch.mm``.
The kernel itself rounds those fp32 weights to bf16 when it is probed with the identity, so
the GEMM's weights are the kernel's weights rounded to bf16 (tests/unit/test_int4_prefill.py).

Packed layout (torch's CPU int4 packing, ``_convert_weight_to_int4pack_for_cpu`` with
``inner_k_tiles`` 1, ``[N, K/2]`` uint8): every full block of 64 output rows is a ``[K, 32]``
byte tile, byte ``[k, d]`` holding row ``d`` in its low nibble and row ``d + 32`` in its high
one; a last block of ``n < 64`` rows is a ``[K, n/2]`` tile of row pairs ``2d`` (low) and
``2d + 1`` (high). The tests check this against the packing itself.
"""

from __future__ import annotations

import threading

import torch

from tdllm.model.linear import scratch_tensor

PACK_BLOCK = 64  # output rows torch's CPU int4 packing lays out as one tile
# weights dequantized at a time: ~1M (2 MiB bf16, 4 MiB fp32, 1 MiB codes of scratch) stays in
# L3 and keeps oneDNN's GEMM wide (576 inputs: 1792 rows; 8192 inputs: 128 rows); fewer, larger
# blocks also mean fewer OpenMP regions (each a barrier a descheduled thread stalls)
WIDEN_BLOCK_WEIGHTS = 1 << 20

_scratch = threading.local()  # per-thread scratch, grown to the largest block seen


def _buffer(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    held: dict[str, torch.Tensor] = _scratch.__dict__.setdefault("buffers", {})
    buffer = held.get(name)
    if buffer is None or buffer.numel() < numel:
        buffer = held[name] = scratch_tensor(numel, dtype)
    return buffer[:numel]


def block_rows(in_features: int) -> int:
    """Output rows dequantized at a time: a multiple of `PACK_BLOCK` near `WIDEN_BLOCK_WEIGHTS`."""
    return max(PACK_BLOCK, WIDEN_BLOCK_WEIGHTS // in_features // PACK_BLOCK * PACK_BLOCK)


def unpack_codes_t(packed: torch.Tensor, start: int, rows: int, out: torch.Tensor) -> None:
    """Codes ``q`` (0..15) of packed output rows ``start:start+rows`` into `out` ``[K, rows]``
    (any dtype), transposed: the GEMM's right operand. `start` is a multiple of `PACK_BLOCK`;
    `rows` too, but for the packing's last, shorter block."""
    k = packed.shape[1] * 2
    full, tail = rows // PACK_BLOCK * PACK_BLOCK, rows % PACK_BLOCK
    nibbles = _buffer("nibbles", rows * k, torch.uint8)
    if full:
        # low and high nibbles into contiguous halves, then each copied (and widened) into its
        # rows: measured 2x faster than writing them interleaved
        tiles = packed[start : start + full].view(full // PACK_BLOCK, k, PACK_BLOCK // 2)
        by_tile = out[:, :full].view(k, full // PACK_BLOCK, 2, PACK_BLOCK // 2)
        for half, nibble in enumerate(nibbles[: full * k].view(2, *tiles.shape)):
            if half:
                torch.bitwise_right_shift(tiles, 4, out=nibble)
            else:
                torch.bitwise_and(tiles, 15, out=nibble)
            by_tile[:, :, half].copy_(nibble.transpose(0, 1))
    if tail:
        tile = packed[start + full : start + rows].view(k, tail // 2)
        codes = nibbles[full * k :].view(k, tail // 2, 2)
        torch.bitwise_and(tile, 15, out=codes[:, :, 0])
        torch.bitwise_right_shift(tile, 4, out=codes[:, :, 1])
        out[:, full:].copy_(codes.view(k, tail))


def dequantize_t(
    packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int, start: int, rows: int
) -> torch.Tensor:
    """The kernel's weights of output rows ``start:start+rows``, transposed ``[K, rows]``, in
    bf16: ``(q - 8) * s + z`` in fp32 (exact but for the one rounding of the sum, as the
    kernel's fma), then rounded to bf16. A view of per-thread scratch: use it before the next
    call."""
    k = packed.shape[1] * 2
    groups = k // group_size
    weights = _buffer("fp32", rows * k, torch.float32).view(k, rows)
    unpack_codes_t(packed, start, rows, weights)
    weights.sub_(8)  # exact: -8..7
    # contiguous fp32 scales and zeros (bf16 -> fp32 is exact): strided ones would take
    # addcmul off its vectorized loop
    scales = sz_part(scales_zeros, start, rows, 0)
    zeros = sz_part(scales_zeros, start, rows, 1)
    widened = _buffer("bf16", rows * k, torch.bfloat16).view(k, rows)
    by_group = weights.view(groups, group_size, rows)
    # one rounding to fp32 (the product is exact), then to bf16 as the output is cast
    torch.addcmul(zeros, by_group, scales, out=widened.view(groups, group_size, rows))
    return widened


def sz_part(scales_zeros: torch.Tensor, start: int, rows: int, which: int) -> torch.Tensor:
    """Scales (0) or zeros (1) of output rows ``start:start+rows`` as fp32 ``[groups, 1, rows]``."""
    part = _buffer(f"sz{which}", scales_zeros.shape[0] * rows, torch.float32)
    part = part.view(scales_zeros.shape[0], 1, rows)
    part.copy_(scales_zeros[:, None, start : start + rows, which])
    return part


def int4_widened_linear(
    x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int, n: int
) -> torch.Tensor:
    """``x [M, K] bf16`` times the first `n` output rows of the packed int4 weight, as bf16
    ``[M, n]``: oneDNN's bf16 GEMM over the weights dequantized `block_rows` at a time."""
    out = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    step = block_rows(x.shape[1])
    for start in range(0, n, step):
        rows = min(step, packed.shape[0] - start)  # padding rows ride along in the last block
        used = min(rows, n - start)
        weights = dequantize_t(packed, scales_zeros, group_size, start, rows)
        torch.mm(x, weights[:, :used], out=out[:, start : start + used])
    return out
