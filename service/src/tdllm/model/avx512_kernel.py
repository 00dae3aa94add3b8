"""Our kernels for AVX-512 VNNI CPUs (``kernels/*.cpp``, one library), built at first use.

- ``quant: w8a8-avx512`` runs W8A8's product on ``w8a8_avx512.cpp`` (`tdllm.model.w8a8_packed`,
  backend ``avx512``): at one row it streams the int8 weights 1.1-2x faster than FBGEMM (24-26
  GB/s on the 1B shapes), from 16 rows it runs AMX tiles where the CPU has them
  (docs/performance.md, "Our own W8A8 kernel").
- ``quant: w4a8-avx512`` runs int4 weights times inputs rounded to int8 per 32 on
  ``w4a8_avx512.cpp`` (`tdllm.model.int4_methods.Int4Avx512Method`; docs/performance.md, "Our own
  int4 kernel").

Built at first use, like every kernel of ours (`tdllm.model.kernel_build`: a C++ compiler and
ninja, a directory only this user can write). `tdllm.model.avx2_kernel` builds the int4 kernel
for a CPU without AVX-512.
"""

from __future__ import annotations

import functools
import threading

import torch

from tdllm.errors import ModelLoadError
from tdllm.model import avx2_kernel, kernel_build, w4a8_ops
from tdllm.model.cpu_features import HAS_AMX, HAS_VNNI, cpu_flags

SOURCES = ("w8a8_avx512", "w4a8_avx512")
NAME = "tdllm_avx512"
# what the kernel's instructions need (VPDPBUSD on 512-bit registers, byte masks)
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")
FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vnni")
# rows from which the product runs on AMX tiles where the CPU has them (0: never); below it the
# VNNI stream, which reads the weights once for every six rows
AMX_MIN_ROWS = 16 if HAS_AMX and "amx_int8" in cpu_flags() else 0

GROUP = w4a8_ops.GROUP  # inputs per int4 scale and offset, and per rounded input group
BLOCK = w4a8_ops.BLOCK  # outputs per block of `pack4`'s layout
# weights widened to bf16 at a time for a prompt (`w4a8_widened`): 8 MiB, in L3 when the GEMM
# reads it (int4's widening measured 4M blocks 1.1-1.4x faster than 1M on the 1B shapes)
WIDEN_WEIGHTS = 1 << 22
# From how many rows `Int4Avx512Method` runs `w4a8_widened` rather than `w4a8` (0: never): where
# oneDNN has AMX its bf16 GEMM is nearly free and the widening is the cost; elsewhere the VNNI
# kernel's rows stay the faster (docs/performance.md, "Our own int4 kernel")
W4A8_WIDEN_MIN_ROWS = 160 if HAS_AMX else 0


def missing_cpu_flags(flags: set[str] | None = None) -> list[str]:
    """The `CPU_FLAGS` this CPU lacks (`flags`: its flags; read from /proc/cpuinfo when None)."""
    have = cpu_flags() if flags is None else flags
    return [flag for flag in CPU_FLAGS if flag not in have]


def fallback(quant: str) -> str:
    """What to use where `quant`'s kernel cannot run. FBGEMM's W8A8 needs VNNI too: a CPU with
    AVX2 only (an AMD EPYC before Zen 4) runs neither, and int8 weight-only instead."""
    if quant == "w4a8-avx512":
        return "int4" if avx2_kernel.missing_cpu_flags() else "w4a8 (our AVX2 kernel)"
    return "w8a8" if HAS_VNNI else "int8"


def why_unavailable(quant: str = "w8a8-avx512") -> str | None:
    """Why `quant`'s kernel cannot run here, in one line (None: it can be built and run)."""
    missing = missing_cpu_flags()
    if missing:
        return (
            f"quant {quant} needs AVX-512 VNNI; this CPU lacks {', '.join(missing)}: "
            f"use {fallback(quant)}"
        )
    return kernel_build.missing_tools(quant)


def describe() -> str:
    rows = f"w8a8 on AMX from {AMX_MIN_ROWS} rows" if AMX_MIN_ROWS else "no AMX"
    return f"w8a8-avx512, w4a8, w4a8-avx512 can be built (AVX-512 VNNI, {rows}; built at first use)"


def load(quant: str = "w8a8-avx512") -> None:
    """Build (once per source and torch version; ninja skips an up-to-date build) and load
    the kernels, registering ``torch.ops.tdllm_avx512``. Raises `ModelLoadError`, one line, when
    `quant`'s cannot run here (`why_unavailable`) or the build fails."""
    reason = why_unavailable(quant)
    if reason:
        raise ModelLoadError(reason)
    _build()


@functools.cache
def _build() -> None:
    kernel_build.build(NAME, SOURCES, FLAGS, "AVX-512 kernels")
    torch.library.register_fake("tdllm_avx512::w4a8", w4a8_ops.output_shape)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K] int8`` in the kernel's layout (`load` first)."""
    return torch.ops.tdllm_avx512.pack(weight)


def row_sums(weight: torch.Tensor, outputs: int) -> torch.Tensor:
    """Each row's sum (int32), zeros after them up to `outputs`."""
    return torch.ops.tdllm_avx512.row_sums(weight, outputs)


def unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return torch.ops.tdllm_avx512.unpack(packed, n, k)


def product(
    scaled: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    sums: torch.Tensor,
    n: int,
    k: int,
    x_step: float,
    amx_min_rows: int = AMX_MIN_ROWS,
) -> torch.Tensor:
    """``scaled [M, >= K]`` (fp32 rows in [-1, 1]) times the `packed` weights, fp32 ``[M, N]``;
    `scales` and `sums` padded to the packed outputs (`pack`)."""
    return torch.ops.tdllm_avx512.w8a8(scaled, packed, scales, sums, n, k, x_step, amx_min_rows)


# the int4 ops (`w4a8_ops.W4A8Ops`: `load` first)
_INT4 = w4a8_ops.W4A8Ops("tdllm_avx512")
pack4 = _INT4.pack4
unpack4 = _INT4.unpack4
w4a8 = _INT4.w4a8


def widen4(
    packed: torch.Tensor, k: int, first: int, blocks: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The `pack4` weights of outputs ``[first, first + 64 * blocks)`` (`first` a multiple of
    64) in bf16, transposed: ``[k, 64 * blocks]`` (the padding outputs are zero), written into
    `out` (a bf16 buffer of at least ``k * (64 * blocks + 32)``; None: a new one)."""
    width = blocks * BLOCK
    stride = width + 32  # not a multiple of 4 KiB (see the kernel)
    if out is None:
        out = torch.empty(k * stride, dtype=torch.bfloat16)
    wt = out[: k * stride].view(k, stride)
    torch.ops.tdllm_avx512.widen4(packed, k, first, blocks, wt)
    return wt[:, :width]


_scratch = threading.local()  # per thread: the widening's buffer, grown to the largest seen


def w4a8_widened(x: torch.Tensor, packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``x [M, K]`` times the `pack4` weights on oneDNN's bf16 GEMM (AMX tiles where the CPU has
    them): the weights widened to bf16 `WIDEN_WEIGHTS` at a time into one reused buffer (a fresh
    one per block cost its page faults: 3-4x the widening itself), the input rounded to bf16 (not
    to int8 per 32 as in `w4a8`); bf16 ``[M, n]``."""
    xb = x.to(torch.bfloat16)
    step = max(BLOCK, WIDEN_WEIGHTS // k // BLOCK * BLOCK)  # outputs a widening
    size = k * (min(step, -(-n // BLOCK) * BLOCK) + 32)
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < size:
        buffer = _scratch.buffer = torch.empty(size, dtype=torch.bfloat16)
    parts = []
    for first in range(0, n, step):
        count = min(step, n - first)
        wt = widen4(packed, k, first, -(-count // BLOCK), buffer)
        parts.append(torch.mm(xb, wt[:, :count]))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
