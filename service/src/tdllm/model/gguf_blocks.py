"""A GGUF-quantized weight as its raw blocks (`GgufQuantized`), and the decoding of the block
types that map onto our int kernels without a float detour.

The GGUF reader (`tdllm.model.checkpoint`) hands these through when the loader asks (the model
has a method that takes them, `TakesGgufBlocks`); every other consumer gets floats, one tensor at
a time, from `GgufQuantized.dequantize`. Row r of a ``[rows, cols]`` weight is the bytes
``blocks[r]``: ``cols / block_size`` blocks, each a run of `block_size` weights, so output rows
can be sliced and permuted on the raw bytes (each row's blocks move together).

Block layouts (ggml's, as the ``gguf`` package's ``gguf/quants.py`` reads them; little-endian):

- Q4_0, 18 bytes per 32 weights: fp16 ``d``, 16 bytes of nibbles; weight i < 16 is the low
  nibble of byte i, weight 16 + i its high nibble; ``w = d * (q - 8)``.
- Q4_1, 20 bytes per 32: fp16 ``d``, fp16 ``m``, 16 bytes of nibbles as Q4_0; ``w = d * q + m``.
- Q8_0, 34 bytes per 32: fp16 ``d``, 32 int8 ``q``; ``w = d * q``.
- Q4_K, 144 bytes per 256: fp16 ``d``, fp16 ``dmin``, 12 bytes of eight 6-bit scales ``sc`` and
  mins ``mn``, 128 bytes of nibbles: byte i of the j-th run of 32 bytes holds weight i of
  sub-block 2j (low nibble) and of sub-block 2j + 1 (high); sub-block s (32 weights) has
  ``w = (d * sc[s]) * q - dmin * mn[s]``.

`GgufQuantized.affine` decodes Q4_0, Q4_1, Q4_K and Q8_0 into ``w = scale * code + offset`` per
group of 32 (codes 0..15 for the 4-bit types, -128..127 for Q8_0), with exactly the float32
operations ``gguf.quants.dequantize`` does, so `dequantize` is bit-identical to it (tested on the
bundled file's tensors). Other types (Q6_K, ...) dequantize through the ``gguf`` package.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    from tdllm.model.linear import Linear

GROUP = 32  # weights per scale in every type `affine` decodes (Q4_K: per sub-block)
INT4_KINDS = ("Q4_0", "Q4_1", "Q4_K")  # codes 0..15 with a scale and offset per 32 weights
AFFINE_KINDS = (*INT4_KINDS, "Q8_0")
_K_SCALE_BYTES = 12  # Q4_K's packed 6-bit scales and mins
_DEQUANT_ROWS = 1024  # rows decoded at a time by `dequantize`


@runtime_checkable
class TakesGgufBlocks(Protocol):
    """A `LinearMethod` that takes a projection's rows as GGUF blocks (`StagedQuantMethod`)."""

    def load_blocks(self, layer: Linear, blocks: GgufQuantized, row_offset: int = 0) -> None:
        """Like ``load_weight``: rows ``row_offset:row_offset+rows`` of the projection."""
        ...


@dataclass(frozen=True, eq=False)
class GgufQuantized:
    """A 2-D weight ``shape = (rows, cols)`` (PyTorch order) stored as GGUF type `kind`:
    `blocks` is ``uint8 [rows, cols / block_size * type_size]``, a view of the file's memory
    map or a copy (after a row permutation)."""

    kind: str
    shape: tuple[int, int]
    blocks: np.ndarray
    # a view of a file's map: drops the pages of rows it is given from this process's RSS
    # (`GgufTensors.release_view`); None for blocks in our own memory
    release: Callable[[np.ndarray], None] | None = None

    def __post_init__(self) -> None:
        block_size, type_size = block_geometry(self.kind)
        rows, cols = self.shape
        if rows <= 0 or cols <= 0:
            raise ValueError(f"{self.kind} tensor of shape {self.shape}: empty")
        if cols % block_size:
            raise ValueError(
                f"{self.kind} tensor of shape {self.shape}: {cols} columns are not a multiple "
                f"of its block of {block_size}"
            )
        want = (rows, cols // block_size * type_size)
        if self.blocks.dtype != np.uint8 or tuple(self.blocks.shape) != want:
            raise ValueError(
                f"{self.kind} tensor of shape {self.shape}: expected {want[0]} rows of "
                f"{want[1]} bytes ({cols // block_size} blocks of {type_size}), got "
                f"{self.blocks.dtype} {tuple(self.blocks.shape)}"
            )

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    def row_slice(self, start: int, stop: int) -> GgufQuantized:
        """Rows ``start:stop`` (a view)."""
        if not 0 <= start < stop <= self.rows:
            raise ValueError(f"rows {start}:{stop} of a {self.rows}-row tensor")
        return GgufQuantized(
            self.kind, (stop - start, self.cols), self.blocks[start:stop], self.release
        )

    def taken(self, start: int, stop: int) -> None:
        """The consumer has its own copy of rows ``start:stop``: a view of a file's map lets
        their pages go now, not after the whole tensor (the 8B shape's head: 0.5 GB of file
        pages beside its staging, the load's peak)."""
        if self.release is not None:
            self.release(self.blocks[start:stop])

    def permute_rows(self, order: np.ndarray) -> GgufQuantized:
        """Row i of the result is row ``order[i]`` (a copy of the bytes)."""
        if sorted(order.tolist()) != list(range(self.rows)):
            raise ValueError(f"not a permutation of {self.rows} rows")
        return GgufQuantized(self.kind, self.shape, np.ascontiguousarray(self.blocks[order]))

    def affine(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(codes [rows, cols], scale [rows, cols/32] fp32, offset same or None)`` with
        ``w = scale * code + offset`` per group of 32 inputs (`AFFINE_KINDS` only); codes are
        uint8 0..15 for the 4-bit types, int8 for Q8_0 (whose offset is None)."""
        rows, cols = self.shape
        b = self.blocks.reshape(rows, -1, block_geometry(self.kind)[1])  # [rows, blocks, bytes]
        if self.kind == "Q8_0":
            d = _fp16(b[..., 0:2])
            return b[..., 2:].view(np.int8).reshape(rows, cols), d, None
        if self.kind in ("Q4_0", "Q4_1"):
            d = _fp16(b[..., 0:2])
            nibbles = b[..., 2:] if self.kind == "Q4_0" else b[..., 4:]
            codes = _unpack_nibbles(nibbles).reshape(rows, cols)
            if self.kind == "Q4_0":  # d * (q - 8) == d * q + (-8 d): every step exact in fp32
                return codes, d, d * np.float32(-8)
            return codes, d, _fp16(b[..., 2:4])
        if self.kind == "Q4_K":
            d, dmin = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])  # [rows, super-blocks]
            sc, mn = _q4k_scales_mins(b[..., 4 : 4 + _K_SCALE_BYTES])  # [rows, super, 8]
            # runs of 32 bytes: low nibbles are sub-block 2j, high ones 2j + 1
            runs = b[..., 4 + _K_SCALE_BYTES :].reshape(rows, -1, 4, 1, 32)
            codes = (runs >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)) & np.uint8(0x0F)
            scale = d[..., None] * sc.astype(np.float32)
            offset = -(dmin[..., None] * mn.astype(np.float32))
            return codes.reshape(rows, cols), scale.reshape(rows, -1), offset.reshape(rows, -1)
        raise ValueError(f"{self.kind} blocks have no affine decoding here; dequantize them")

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` as fp32 ``[n, cols]`` (fresh, writable memory): what
        ``gguf.quants.dequantize`` gives, bit for bit."""
        stop = self.rows if stop is None else stop
        part = self if (start, stop) == (0, self.rows) else self.row_slice(start, stop)
        rows, cols = part.shape
        if part.kind not in AFFINE_KINDS:
            from gguf.constants import GGMLQuantizationType
            from gguf.quants import dequantize

            array = dequantize(part.blocks, GGMLQuantizationType[part.kind])
            return torch.from_numpy(np.array(array, dtype=np.float32).reshape(rows, cols))
        out = np.empty((rows, cols), dtype=np.float32)
        for first in range(0, rows, _DEQUANT_ROWS):  # temporaries of a chunk, not the tensor
            last = min(first + _DEQUANT_ROWS, rows)
            codes, scale, offset = part.row_slice(first, last).affine()
            grouped = out[first:last].reshape(last - first, -1, GROUP)
            grouped[...] = codes.reshape(grouped.shape)
            if part.kind == "Q4_0":  # as ggml: d * (q - 8), so a zero keeps d's sign
                grouped -= np.float32(8)
                offset = None
            grouped *= scale[..., None]
            if offset is not None:
                grouped += offset[..., None]
        return torch.from_numpy(out)


def block_geometry(kind: str) -> tuple[int, int]:
    """``(weights per block, bytes per block)`` of a GGUF quantized type, by name."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType[kind]
    except KeyError:
        raise ValueError(f"unknown GGUF tensor type {kind!r}") from None
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        raise ValueError(f"{kind} is not a quantized type")
    return GGML_QUANT_SIZES[qtype]


def rope_row_order(rows: int, heads: int) -> np.ndarray:
    """The row order that undoes llama.cpp's interleaving of q/k rows per head (the same
    permutation ``checkpoint._unpermute_rope`` applies to a float weight)."""
    if rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of rotary pairs")
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(0, 2, 1).reshape(rows)


# The two passes over every block of a load, in torch (two threads, vectorised strided copies):
# numpy's took 9 of an 8B Q4_0 load's 27 s, torch's a third to a sixth of that (measured).


def _fp16(pairs: np.ndarray) -> np.ndarray:
    """Little-endian fp16 from ``[..., 2]`` bytes, as fp32 ``[...]``."""
    halves = _torch_view(pairs).contiguous().view(torch.float16)[..., 0]
    return halves.float().numpy()


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """``[..., 16]`` bytes -> ``[..., 32]`` codes: the low nibbles, then the high ones."""
    source = _torch_view(packed)
    codes = torch.empty(*source.shape[:-1], 2 * source.shape[-1], dtype=torch.uint8)
    half = source.shape[-1]
    torch.bitwise_and(source, 0x0F, out=codes[..., :half])
    torch.bitwise_right_shift(source, 4, out=codes[..., half:])
    return codes.numpy()


def _torch_view(array: np.ndarray) -> torch.Tensor:
    """`array` as a tensor sharing its memory, only ever read (a file's map is read-only)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(array)


def _q4k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins (``[..., 8]`` uint8 each):
    bytes 0-3 hold scales 0-3 (low 6 bits), 4-7 mins 0-3; bytes 8-11 hold the low 4 bits of
    scales 4-7 (low nibble) and mins 4-7 (high nibble), whose top 2 bits are the top bits of
    bytes 0-3 (scales) and 4-7 (mins)."""
    lo, hi, extra = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([lo & 0x3F, (extra & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([hi & 0x3F, (extra >> 4) | ((hi >> 2) & 0x30)], axis=-1)
    return scales, mins
