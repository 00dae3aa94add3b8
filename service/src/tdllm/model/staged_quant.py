"""What the quantized projections' methods share (the overview: `tdllm.model.quantized`):
`StagedQuantMethod`, their staging, and the helpers that hand their kernels the inputs and
outputs they take (`KERNEL_DTYPE`, `kernel_rows`, `shaped`).

Each method stages a projection's rows already quantized, in the layout its kernel's packing
takes, as they arrive (fused q|k|v and gate|up come one shard at a time, at their row offsets),
and packs the projection the moment its last row is in. Rows arrive as floats (quantized by
the method, `QUANT_BLOCK_ROWS` at a time) or as GGUF blocks (`GgufQuantized`, `load_blocks`): a
type on the method's own grid is taken as it is (int4's Q4 types: `tdllm.model.int4_methods`),
any other is dequantized a chunk of rows at a time and quantized as floats are. A method never
holds a float copy of a projection: the only one is what a reader hands over (none for GGUF
blocks).
A sealed reader never decrypts into a quantized buffer (`Transformer.weight_destinations`
names plain weights only): its plaintext arrives through `load_weight` like any checkpoint's.
Staged rows are buffers, so a failed load's scrub (`loader._zero`) reaches them too.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from tdllm.model.gguf_blocks import GgufQuantized
from tdllm.model.linear import Linear, TdCpuKernels

KERNEL_DTYPE = torch.bfloat16  # of the activations and scales the kernels are given
QUANT_BLOCK_ROWS = 256  # rows quantized at a time: temporaries under glibc's mmap threshold


class StagedQuantMethod(TdCpuKernels, ABC):
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
                released = buffer.untyped_storage().nbytes() == 0  # by `pack` (`release`)
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
        `pack` scrubbed and freed one itself: `release`)."""


def release(tensor: torch.Tensor) -> None:
    """Scrub `tensor` and free its memory now, though references to it remain (a staged
    buffer `_take` still holds): its storage shrinks to nothing."""
    tensor.zero_()
    tensor.untyped_storage().resize_(0)


def _quantized(layer: Linear) -> bool:
    return layer._buffers.get("qweight") is not None or "w8a8_handle" in layer.__dict__


def kernel_rows(x: torch.Tensor) -> torch.Tensor:
    """``x[..., K]`` as the kernels take it: 2-D, contiguous, `KERNEL_DTYPE`. (Each cast and
    reshape only where needed: a no-op still costs a dispatch, ~120 per decode step.)"""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    rows = rows if rows.dtype == KERNEL_DTYPE else rows.to(KERNEL_DTYPE)
    return rows.contiguous()


def shaped(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A kernel's ``[M, N]`` output in `x`'s leading shape and dtype."""
    y = y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
    return y if y.dtype == x.dtype else y.to(x.dtype)
