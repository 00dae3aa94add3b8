"""What our two int4 kernels share in Python (`tdllm.model.avx512_kernel`'s ``tdllm_avx512`` and
`tdllm.model.avx2_kernel`'s ``tdllm_avx2``: the same ops on the same layout,
``kernels/w4a8_layout.h``), given the library's op namespace."""

from __future__ import annotations

from typing import Any

import torch

GROUP = 32  # inputs per int4 scale and offset, and per rounded input group
BLOCK = 64  # outputs per block of `pack4`'s layout
FP16_MAX = 65504.0  # the scales and offsets are fp16


def output_shape(x: torch.Tensor, packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``w4a8``'s output as a compiled graph sees it (the op's fake)."""
    return x.new_empty(*x.shape[:-1], n)


class ScaleRangeError(ValueError):
    """A scale or offset fp16 cannot hold."""


def check_fp16(what: str, *tensors: torch.Tensor) -> None:
    """ValueError where a value of `tensors` (`what`: "int4 scales and offsets") is beyond
    fp16's range (or NaN): the kernels keep them as fp16, and an infinity stored would be a
    wrong model, not an error."""
    if not max(float(t.abs().max()) for t in tensors) <= FP16_MAX:  # or NaN
        raise ScaleRangeError(f"{what} beyond fp16's range")


class W4A8Ops:
    """The int4 ops of one library, by its op namespace (``tdllm_avx512``, ``tdllm_avx2``)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def _ops(self) -> Any:
        return getattr(torch.ops, self.namespace)

    def pack4(
        self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        """int4 ``codes [N, K]`` (uint8, 0..15) with a scale and an offset per 32 inputs (``[N,
        K/32]`` fp32: ``w = q * scale + offset``) in the kernels' layout (the library loaded
        first); scales and offsets are kept as fp16 (ValueError outside its range)."""
        check_fp16("int4 scales and offsets", scales, offsets)
        packed: torch.Tensor = self._ops().pack4(codes, scales, offsets)
        return packed

    def unpack4(
        self, packed: torch.Tensor, n: int, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes, scales, offsets)`` read back from `pack4`'s layout."""
        codes, scales, offsets = self._ops().unpack4(packed, n, k)
        return codes, scales, offsets

    def w4a8(self, x: torch.Tensor, packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """``x [..., K]`` (fp32 or bf16), rounded to int8 per 32 inputs, times the `pack4`
        weights: ``[..., n]`` in x's dtype (a bf16 output rounded to nearest even, as ``.to``
        rounds)."""
        y: torch.Tensor = self._ops().w4a8(x, packed, n, k)
        return y
