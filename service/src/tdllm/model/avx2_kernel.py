"""Our kernels for CPUs without AVX-512 (``kernels/int_avx2.cpp``; an AMD EPYC before Zen 4, an
Intel core before Ice Lake), built at first use (`tdllm.model.kernel_build`).

``quant: w4a8`` runs int4 weights times inputs rounded to int8 per 32 on the AVX-512 VNNI kernel
where the CPU has it (`tdllm.model.avx512_kernel`) and on this one elsewhere: the same layout
(``kernels/w4a8_layout.h``), the same integer sums scaled in the same order, so the same bits
(tested). torch's own int4 and int8 kernels read a decode step's weights at ~7 GB/s on such a
CPU where the bus gives 28-30 (docs/performance.md, "A CPU without AVX-512").

`w8a8g` is the int8 product of the same kind (Q8_0's grid and bytes: int8 codes with an fp16
scale per 32 inputs, times inputs rounded to int8 per 32): ``quant: w8a8-avx2``, and ``w4a8``'s
head here (`tdllm.model.int8_methods.Int8GroupAvx2Method`), where torch's int8 kernel read the 1B
shape's 262 MB head at 13 GB/s. ``w4a8`` holds Q4_0's grid without offsets here (`pack4`).
"""

from __future__ import annotations

import functools

import torch

from tdllm.errors import ModelLoadError
from tdllm.model import kernel_build, w4a8_ops
from tdllm.model.cpu_features import cpu_flags

NAME = "tdllm_avx2"
SOURCES = ("int_avx2", "decode_block_avx2")
CPU_FLAGS = ("avx2", "fma", "f16c")  # VPMADDUBSW on 256-bit registers, FMA, fp16 scales
FLAGS = ("-mavx2", "-mfma", "-mf16c")
GROUP = w4a8_ops.GROUP


def missing_cpu_flags(flags: set[str] | None = None) -> list[str]:
    """The `CPU_FLAGS` this CPU lacks (`flags`: its flags; read from /proc/cpuinfo when None)."""
    have = cpu_flags() if flags is None else flags
    return [flag for flag in CPU_FLAGS if flag not in have]


def why_unavailable(quant: str = "w4a8") -> str | None:
    """Why this kernel cannot run here, in one line (None: it can be built and run)."""
    missing = missing_cpu_flags()
    if missing:
        return f"quant {quant} needs AVX2; this CPU lacks {', '.join(missing)}: use int4"
    return kernel_build.missing_tools(quant)


def describe() -> str:
    return (
        "w8a8-avx2, w4a8 can be built (AVX2, no AVX-512 needed; built at first use); "
        "fp32 blocks on them decode in one op each"
    )


def load(quant: str = "w4a8") -> None:
    """Build and load the kernel, registering ``torch.ops.tdllm_avx2``; `ModelLoadError`, one
    line, when it cannot run here (`why_unavailable`) or the build fails."""
    reason = why_unavailable(quant)
    if reason:
        raise ModelLoadError(reason)
    _build()


@functools.cache
def _build() -> None:
    kernel_build.build(NAME, SOURCES, FLAGS, "AVX2 int4 kernel")
    torch.library.register_fake("tdllm_avx2::w4a8", w4a8_ops.output_shape)
    torch.library.register_fake("tdllm_avx2::w8a8g", w4a8_ops.output_shape)


# the int4 ops (`w4a8_ops.W4A8Ops`: `load` first)
_INT4 = w4a8_ops.W4A8Ops("tdllm_avx2")
unpack4 = _INT4.unpack4  # either form: the symmetric one's offsets read back as -8 scale
w4a8 = _INT4.w4a8  # either form


def pack4(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`w4a8_ops.W4A8Ops.pack4` for this kernel: where every offset is -8 times its scale in fp16
    (Q4_0's grid, ``w = (q - 8) * scale``) the layout's symmetric form, which leaves the offsets
    out (1152 bytes a group of 64 outputs, not 1280: Q4_0's 18 a 32) and gives the same bits;
    the full layout elsewhere (Q4_1, Q4_K, floats quantized at load)."""
    w4a8_ops.check_fp16("int4 scales and offsets", scales, offsets)
    packed: torch.Tensor
    if torch.equal(offsets.half(), scales.half().mul(-8)):  # exact, or inf: then not equal
        packed = torch.ops.tdllm_avx2.pack4s(codes, scales)
    else:
        packed = torch.ops.tdllm_avx2.pack4(codes, scales, offsets)
    return packed


def empty8(n: int, k: int) -> torch.Tensor:
    """A zeroed `w8a8g` layout for ``n`` outputs of ``k`` inputs (rows go in with `pack8_into`):
    per block of 64 outputs and group of 32 inputs, the codes then 64 fp16 scales."""
    blocks = -(-n // w4a8_ops.BLOCK)
    return torch.zeros(
        blocks, k // GROUP, w4a8_ops.BLOCK * GROUP + 2 * w4a8_ops.BLOCK, dtype=torch.uint8
    )


def pack8_into(packed: torch.Tensor, first: int, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Rows ``first:first + R`` of `packed` (`empty8`) from int8 ``codes [R, K]`` (-128..127)
    with a scale per 32 inputs (``w = q * scale``; `load` first); fp16 scales (ValueError
    outside its range, before anything is written)."""
    w4a8_ops.check_fp16("int8 scales", scales)
    torch.ops.tdllm_avx2.pack8_into(packed, first, codes, scales)


def unpack8(packed: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes [n, k] int8, scales [n, k/32] fp32)`` read back from `pack8_into`'s layout."""
    codes, scales = torch.ops.tdllm_avx2.unpack8(packed, n, k)
    return codes, scales


def rows8(packed: torch.Tensor, rows: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Rows `rows` (int64 ``[T]``; IndexError for one outside ``0..n-1``) of a `pack8_into`
    layout decoded to fp32 ``[T, K]``: ``q * scale``, a Q8_0 block's ``d * q`` exactly (a tied
    embedding read from its head)."""
    return torch.ops.tdllm_avx2.rows8(packed, rows, n, k)


def w8a8g(x: torch.Tensor, packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``x [..., K]`` (fp32 or bf16), rounded to int8 per 32 inputs, times the `pack8_into` weights:
    ``[..., n]`` in x's dtype."""
    return torch.ops.tdllm_avx2.w8a8g(x, packed, n, k)
