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
``inner_k_tiles`` 1, ``[N, K/2]`` uint8): output rows in tiles of `PackLayout.block` (64 where
ATen runs its AVX-512 code, 32 with AVX2 or its portable code), each a ``[K, block/2]`` byte
tile. In a full tile on AVX-512 or AVX2 byte ``[k, d]`` holds row ``d`` in its low nibble and
row ``d + block/2`` in its high one; in the portable code's tiles, and in every last, shorter
tile, it holds rows ``2d`` (low) and ``2d + 1`` (high). Which one this process's torch writes is
probed once (`pack_layout`) rather than read off the CPU's flags: ``ATEN_CPU_CAPABILITY`` can
lower the level. The tests check both functions against the packing itself; the load writes
the layout with `pack_codes` (byte ops, no int32 copy of the codes) rather than torch's packing.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch

from tdllm.model.cpu_features import HAS_AMX, HAS_NATIVE_BF16
from tdllm.model.linear import scratch_tensor

# weights dequantized at a time: ~4M (8 MiB bf16 and 4 MiB of bytes of scratch, in L3) keeps
# oneDNN's GEMM wide and the OpenMP regions few (each op on a block is one, a barrier). Measured
# against 1M blocks on the Xeon: the 1B shape's projections 1.1-1.4x faster at 64-128 rows,
# the bundled ones (one block each now) 1.0-1.1x (docs/performance.md, "int4 prefill, widened")
WIDEN_BLOCK_WEIGHTS = 1 << 22

# From how many rows a projection runs widened. Where oneDNN has AMX its GEMM is nearly free and
# the dequantization is the cost: ~0.7 ns a weight on 1B-wide layers, which the int4 kernel's
# ~12.5 ps a weight a row passes at ~56 rows, and ~1 ns on the bundled model's narrow ones (at 64
# rows the kernel still wins or ties there); without AMX from ~128 rows on every shape measured
PREFILL_MIN_ROWS = 128
AMX_MIN_ROWS = 64  # where oneDNN has AMX, for layers of at least `AMX_WIDE_LAYER` weights
AMX_WIDE_LAYER = 1 << 21
NEVER = 1 << 62  # rows no input reaches: the kernel at every length

_scratch = threading.local()  # per-thread scratch, grown to the largest block seen


def _buffer(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    held: dict[str, torch.Tensor] = _scratch.__dict__.setdefault("buffers", {})
    buffer = held.get(name)
    if buffer is None or buffer.numel() < numel:
        buffer = held[name] = scratch_tensor(numel, dtype)
    return buffer[:numel]


def prefill_min_rows(in_features: int, out_features: int) -> int:
    """From how many rows a projection of this shape runs widened rather than on the kernel:
    never where the CPU has no bf16 arithmetic (`cpu_features.HAS_NATIVE_BF16`: torch's bf16
    GEMM took 16 s where int4's kernel took 53 ms, a 512-row prompt on a 1B-wide layer)."""
    if not HAS_NATIVE_BF16:
        return NEVER
    if HAS_AMX and in_features * out_features >= AMX_WIDE_LAYER:
        return min(PREFILL_MIN_ROWS, AMX_MIN_ROWS)
    return PREFILL_MIN_ROWS


@dataclass(frozen=True)
class PackLayout:
    """How torch's CPU int4 packing lays out output rows (module docstring)."""

    block: int  # output rows a tile: ``[K, block/2]`` bytes
    halves: bool  # a full tile pairs row d with row d + block/2; else rows 2d and 2d + 1


# ATen's tiles are 4 vectors of fp32 wide: AVX-512, AVX2 and x86's portable code, NEON's
_LAYOUTS = (
    PackLayout(64, True),
    PackLayout(32, True),
    PackLayout(32, False),
    PackLayout(16, False),
)


@functools.cache
def pack_layout() -> PackLayout:
    """The layout this process's torch packs int4 in: the one of `_LAYOUTS` whose bytes equal
    torch's for codes spanning full tiles and a shorter last one. RuntimeError if none does
    (a torch whose packing changed: our bytes would feed its kernel wrong weights)."""
    codes = torch.randint(0, 16, (208, 32), generator=torch.Generator().manual_seed(0))
    want = torch._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
    ours = torch.empty_like(want)
    for layout in _LAYOUTS:
        _pack(codes.to(torch.uint8), ours, layout)
        if torch.equal(ours, want):
            return layout
    raise RuntimeError(
        f"torch {torch.__version__} packs int4 weights for this CPU "
        f"({torch.backends.cpu.get_cpu_capability()}) in a layout tdllm does not know: "
        "use quant int8, or no quant"
    )


def block_rows(in_features: int) -> int:
    """Output rows dequantized at a time: a multiple of the packing's tile near
    `WIDEN_BLOCK_WEIGHTS`."""
    tile = pack_layout().block
    return max(tile, WIDEN_BLOCK_WEIGHTS // in_features // tile * tile)


def pack_codes(codes: torch.Tensor, out: torch.Tensor) -> None:
    """uint8 codes ``[N, K]`` (0..15; N a multiple of 16) packed into `out` ``[N, K/2]`` uint8
    exactly as ``torch._convert_weight_to_int4pack_for_cpu(codes.int(), 1)`` packs them (tested
    byte for byte), in two byte ops a tile: no int32 copy of the codes, and 1.7x faster than
    torch's packing on the 1B shape's widest layer (measured)."""
    _pack(codes, out, pack_layout())


def _pack(codes: torch.Tensor, out: torch.Tensor, layout: PackLayout) -> None:
    n = codes.shape[0]
    full = n // layout.block * layout.block
    if full:
        _pack_tiles(codes[:full], out[:full], layout.block, layout.halves)
    if n > full:  # the last, shorter tile: always row pairs
        _pack_tiles(codes[full:], out[full:], n - full, halves=False)


def _pack_tiles(codes: torch.Tensor, out: torch.Tensor, tile: int, halves: bool) -> None:
    """Rows of whole tiles of `tile` rows, two byte ops for all of them."""
    n, k = codes.shape
    if halves:  # byte [k, d] of a tile: row d in the low nibble, row d + tile/2 in the high one
        rows = codes.view(n // tile, 2, tile // 2, k)
        low, high = rows[:, 0], rows[:, 1]
    else:  # rows 2d (low) and 2d + 1 (high)
        rows = codes.view(n // tile, tile // 2, 2, k)
        low, high = rows[:, :, 0], rows[:, :, 1]
    tiles = out.view(n // tile, k, tile // 2)
    torch.bitwise_left_shift(high.transpose(1, 2), 4, out=tiles)
    tiles.bitwise_or_(low.transpose(1, 2))


def unpack_codes_t(packed: torch.Tensor, start: int, rows: int, out: torch.Tensor) -> None:
    """Centred codes ``q - 8`` (-8..7) of packed output rows ``start:start+rows`` into `out`
    ``[K, rows]`` (a signed dtype), transposed: the GEMM's right operand. `start` is a multiple
    of the packing's tile; `rows` too, but for the packing's last, shorter tile.

    The centring is done on the bytes: ``x ^ 0x88`` turns each nibble ``q`` into ``q ^ 8``,
    which read as a 4-bit two's complement number is ``q - 8``; an arithmetic shift of the
    int8 byte sign-extends it. Byte ops cost a fifth of a pass over the widened weights, and
    the widening copy then writes the final values (measured: the dequantization 0.85 -> 0.51
    ns a weight on the 1B shape's up projection, Xeon, 2 threads)."""
    layout = pack_layout()
    k = packed.shape[1] * 2
    full = rows // layout.block * layout.block
    centred = _buffer("centred", rows * k // 2, torch.uint8)
    torch.bitwise_xor(packed[start : start + rows].view(-1), 0x88, out=centred)
    signed = centred.view(torch.int8)
    nibble = _buffer("nibble", rows * k // 2, torch.int8)
    cut = full * k // 2
    if full:
        _unpack_tiles(signed[:cut], nibble[:cut], out[:, :full], layout.block, layout.halves)
    if rows > full:  # the last, shorter tile: row pairs
        _unpack_tiles(signed[cut:], nibble[cut:], out[:, full:], rows - full, halves=False)


def _unpack_tiles(
    signed: torch.Tensor, nibble: torch.Tensor, out: torch.Tensor, tile: int, halves: bool
) -> None:
    """`_pack_tiles` backwards: the bytes of whole tiles into their rows' columns of `out`."""
    k, count = out.shape
    tiles = signed.view(count // tile, k, tile // 2)
    nibbles = nibble.view(tiles.shape)
    if halves:  # row d of a tile, then row d + tile/2
        by_tile = out.view(k, count // tile, 2, tile // 2)
        low, high = by_tile[:, :, 0], by_tile[:, :, 1]
    else:  # rows 2d, then 2d + 1
        by_tile = out.view(k, count // tile, tile // 2, 2)
        low, high = by_tile[..., 0], by_tile[..., 1]
    _low_nibble(tiles, nibbles)
    low.copy_(nibbles.transpose(0, 1))
    torch.bitwise_right_shift(tiles, 4, out=nibbles)
    high.copy_(nibbles.transpose(0, 1))


def _low_nibble(signed: torch.Tensor, out: torch.Tensor) -> None:
    """The low nibble of each int8 byte, sign-extended."""
    torch.bitwise_left_shift(signed, 4, out=out)
    out.bitwise_right_shift_(4)


def dequantize_t(
    packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int, start: int, rows: int
) -> torch.Tensor:
    """The kernel's weights of output rows ``start:start+rows``, transposed ``[K, rows]``, in
    bf16: ``(q - 8) * s + z`` computed in fp32 (the product is exact: 4 by 8 significant bits;
    the sum rounds once, as the kernel's) and rounded to bf16 -- which is what bf16's
    ``addcmul`` does on CPU (each operand widened to fp32, the result rounded back). A view of
    per-thread scratch: use it before the next call."""
    k = packed.shape[1] * 2
    groups = k // group_size
    widened = _buffer("bf16", rows * k, torch.bfloat16).view(k, rows)
    unpack_codes_t(packed, start, rows, widened)  # -8..7: exact in bf16
    # contiguous scales and zeros: strided ones would take addcmul off its vectorized loop, and
    # kept bf16 (as given): with an fp32 operand addcmul takes a path 15x slower
    scales = sz_part(scales_zeros, start, rows, 0)
    zeros = sz_part(scales_zeros, start, rows, 1)
    by_group = widened.view(groups, group_size, rows)
    torch.addcmul(zeros, by_group, scales, out=by_group)
    return widened


def sz_part(scales_zeros: torch.Tensor, start: int, rows: int, which: int) -> torch.Tensor:
    """Scales (0) or zeros (1) of output rows ``start:start+rows``, bf16 ``[groups, 1, rows]``."""
    part = _buffer(f"sz{which}", scales_zeros.shape[0] * rows, scales_zeros.dtype)
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
