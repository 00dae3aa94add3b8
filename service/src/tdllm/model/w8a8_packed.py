"""W8A8's packed int8 weights (`tdllm.model.int8_methods.Int8DynamicMethod`): packing a
projection's staged rows for one of two int8 GEMMs, the product, and reading the weights back
for checks.

The two backends compute the same product: the input rows arrive scaled into [-1, 1] (each row
on its own grid, the caller's doing) with two range columns, rounded to u8 on the grid
``2/255`` around 128, multiplied by the s8 weights, summed in int32 and scaled back.
- ``fbgemm``: FBGEMM's dynamic int8 GEMM (``quantized::linear_dynamic``: VNNI, no AMX). It
  rounds the input itself, from the range the two columns fix.
- ``onednn``: oneDNN's int8 GEMM (``onednn::qlinear_pointwise``), which uses AMX tiles where
  the CPU has them. We round the input to the same grid here and leave the range columns out
  (its weights have none). On an AMX Xeon, in the engine on the 1B shape: prefill 1.4-1.75x
  FBGEMM's, decode at 8-32 sequences 1.14-1.3x, at one 0.83-0.99x: at one row it streams the
  weights ~8% slower, whatever the packing (docs/performance.md, "W8A8 at one row, from
  DRAM"). ``quant: w8a8-onednn`` runs it; ``w8a8`` and int4's W8A8 head stay on FBGEMM.
- ``avx512``: our own kernel (`tdllm.model.avx512_kernel`, built at first use): AVX-512 VNNI
  streaming the weights once per call for up to six rows, and from 16 rows AMX tiles on the same
  packing where the CPU has them: FBGEMM's product 1.1-2x faster at one to eight rows, near
  oneDNN's at a prompt's (docs/performance.md, "Our own W8A8 kernel"). It rounds the input as
  we do for oneDNN. ``quant: w8a8-avx512`` runs it.

A large projection is packed as several row chunks of at most `CHUNK_BYTES`, each its own
matrix, packed on as many threads as torch uses: FBGEMM packs one matrix on one core, and a
whole 128k-row head at once took 2.9 s and a transient copy of itself (the 1B shape's tied
head, 0.26 GB). In chunks, each chunk's staged rows are scrubbed and freed as soon as their
packed copy exists, so the transient is a chunk or two, and the head packs in 1.45 s on 2
threads (docs/performance.md, "A faster GGUF header, W8A8 packed in chunks"). The product runs
the chunks one after another into one output: the same int32 sums per output, so the same
values as one matrix (tested), at the same speed (a chunk is still far larger than a cache).

The packed matrices are not tensors of the layer: a failed load's scrub (`loader._zero`) does
not reach them; they are freed with the layer (a handle registered per layer), in TD memory
like the rest. A compiled decode step calls the product through the ``tdllm::w8a8_linear``
custom op (a graph takes tensors and numbers, not packed objects).
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from tdllm.model import avx512_kernel

# int8 weights per packed matrix: the 1B head in 4, the 8B head in 8. Not smaller: 32 MiB
# blocks fall under glibc's dynamic mmap threshold, so the freed staging stays in the heap
# (1B int4 load, measured: RSS after the load 1478 -> 1641-1659 MiB, the peak 1604 -> 1665)
CHUNK_BYTES = 64 << 20

BACKENDS = ("fbgemm", "onednn", "avx512")
X_STEP = 2 / 255  # the input grid of every backend: rows in [-1, 1], zero point 128
X_ZERO = 128
UNIT_BLOCK = 512  # inputs read back per oneDNN product (`unpack`)


@dataclass(frozen=True)
class OneDnnChunk:
    """A row chunk packed for oneDNN: the opaque packed weight, its per-row scales (fp32) and
    zero points (all 0: symmetric int8)."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor


@dataclass(frozen=True)
class Avx512Chunk:
    """A row chunk packed for our kernel: the int8 weights in its layout, and per row (padded
    to the layout's rows, so the kernel's 16-lane reads stay inside) the scale (fp32) and the
    weights' sum (int32, which takes the input's zero point back out)."""

    packed: torch.Tensor
    scales: torch.Tensor
    sums: torch.Tensor
    rows: int
    cols: int


Chunk = torch.ScriptObject | OneDnnChunk | Avx512Chunk
_PACKED: dict[int, list[Chunk]] = {}  # the chunks of each handle, in row order
_BYTES: dict[int, int] = {}  # the memory they hold (`packed_bytes`)
_handles = itertools.count()


def default_backend() -> str:
    """``fbgemm``: oneDNN's int8 GEMM wins batches and prefill on AMX CPUs but loses up to 17%
    at one row (measured); a deployment picks it by name (``quant: w8a8-onednn``)."""
    return "fbgemm"


def prepare(backend: str) -> None:
    """Refuse an unknown `backend`; build ours (`avx512_kernel.load`, one line on failure)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown W8A8 backend {backend!r}; choose {', '.join(BACKENDS)}")
    if backend == "avx512":
        avx512_kernel.load()


def chunk_spans(rows: int, cols: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of the matrices a `rows` x `cols` int8 weight is packed
    as: equal (but for the last), each at most `CHUNK_BYTES`."""
    most = max(1, CHUNK_BYTES // cols)  # rows a chunk may hold
    chunks = -(-rows // most)
    step = -(-rows // chunks)  # <= most
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def pack(
    chunks: list[torch.Tensor],
    scales: torch.Tensor,
    release: Callable[[torch.Tensor], None],
    owner: object,
    backend: str = "fbgemm",
) -> int:
    """Pack the int8 row `chunks` (``[rows_i, K + 2]`` each, the last two columns the range
    columns' zero weights; per-row `scales` of all of them in order) for `backend`, calling
    `release` on each chunk once the packing's own copy of it exists; a handle freed with
    `owner`."""
    prepare(backend)
    starts = list(itertools.accumulate((c.shape[0] for c in chunks), initial=0))
    sizes = [(c.shape[0], c.shape[1]) for c in chunks]  # before `release` empties them

    def fbgemm(i: int) -> Chunk:
        rows = chunks[i]
        part = scales[starts[i] : starts[i + 1]].double()
        zero_points = torch.zeros(rows.shape[0], dtype=torch.long)
        with warnings.catch_warnings():
            # torch 2.13 deprecates its quantized dtypes; FBGEMM's packing takes nothing else.
            # Only that warning is silenced, only here (docs/performance.md, "W8A8").
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
            weight = torch._make_per_channel_quantized_tensor(rows, part, zero_points, 0)
        release(rows)  # that was a copy; FBGEMM's packing makes another
        return torch.ops.quantized.linear_prepack(weight, None)

    def onednn(i: int) -> Chunk:
        rows = chunks[i]
        weight = rows[:, :-2].contiguous()  # no range columns: oneDNN's input grid is fixed
        release(rows)
        packed = torch.ops.onednn.qlinear_prepack(weight, None)
        release(weight)  # the plaintext's last copy outside the packing
        part = scales[starts[i] : starts[i + 1]].float().clone()
        return OneDnnChunk(packed, part, torch.zeros(rows.shape[0], dtype=torch.long))

    def avx512(i: int) -> Chunk:
        rows = chunks[i]
        weight = rows[:, :-2]
        packed = avx512_kernel.pack(weight)
        sums = avx512_kernel.row_sums(weight, packed.shape[0] * packed.shape[2])
        padded = torch.zeros(sums.shape[0])
        padded[: weight.shape[0]] = scales[starts[i] : starts[i + 1]]
        release(rows)
        return Avx512Chunk(packed, padded, sums, weight.shape[0], weight.shape[1])

    one = {"onednn": onednn, "avx512": avx512}.get(backend, fbgemm)
    # FBGEMM packs a matrix on one core: a chunk per core. Ours is torch's own copy, which uses
    # every core already: a chunk at a time, so the transient is one chunk (1B head: -64 MiB)
    workers = 1 if backend == "avx512" else min(len(chunks), torch.get_num_threads())
    if workers > 1:  # each packing runs on one core with the GIL released
        with ThreadPoolExecutor(workers) as pool:
            packed = list(pool.map(one, range(len(chunks))))
    else:
        packed = [one(i) for i in range(len(chunks))]
    handle = next(_handles)
    _PACKED[handle] = packed
    _BYTES[handle] = sum(_chunk_bytes(c, rows) for c, rows in zip(packed, sizes, strict=True))
    weakref.finalize(owner, _forget, handle)
    return handle


def _chunk_bytes(chunk: Chunk, rows: tuple[int, int]) -> int:
    if isinstance(chunk, Avx512Chunk):
        parts = (chunk.packed, chunk.scales, chunk.sums)
    elif isinstance(chunk, OneDnnChunk):
        parts = (chunk.packed, chunk.scales, chunk.zeros)
    else:
        return rows[0] * (rows[1] + 12)
    return sum(t.numel() * t.element_size() for t in parts)  # oneDNN's: an opaque tensor


def _forget(handle: int) -> None:
    _PACKED.pop(handle, None)
    _BYTES.pop(handle, None)


def product(scaled: torch.Tensor, handle: int) -> torch.Tensor:
    """``scaled [M, K + 2]`` (fp32, every row in [-1, 1], the two range columns last) times
    the packed weights, fp32 ``[M, N]``: the backend's int8 GEMM, chunk by chunk."""
    chunks = _PACKED[handle]
    if isinstance(chunks[0], Avx512Chunk):
        parts = [
            avx512_kernel.product(scaled, c.packed, c.scales, c.sums, c.rows, c.cols, X_STEP)
            for c in chunks
            if isinstance(c, Avx512Chunk)
        ]
    elif isinstance(chunks[0], OneDnnChunk):
        # the grid FBGEMM derives from the range columns, here by hand: round(v / X_STEP) + 128
        qx = torch.round(scaled[:, :-2] * (1 / X_STEP)).add_(X_ZERO).to(torch.uint8)
        parts = [_onednn(qx, c, X_STEP) for c in chunks if isinstance(c, OneDnnChunk)]
    else:
        parts = [torch.ops.quantized.linear_dynamic(scaled, c) for c in chunks]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _onednn(qx: torch.Tensor, chunk: OneDnnChunk, x_step: float) -> torch.Tensor:
    return torch.ops.onednn.qlinear_pointwise(
        qx, x_step, X_ZERO, chunk.packed, chunk.scales, chunk.zeros, None, 1.0, 0,
        torch.float32, "none", [], "",
    )  # fmt: skip


def unpack(handle: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [N, K] int8, scales [N] fp64)`` read back from the packed chunks (oneDNN's packed
    layout has no read-back: its product with the unit rows, exact in int32, gives them)."""
    qs, scales = [], []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        for packed in _PACKED[handle]:
            if isinstance(packed, Avx512Chunk):
                qs.append(avx512_kernel.unpack(packed.packed, packed.rows, packed.cols))
                scales.append(packed.scales[: packed.rows].double())
                continue
            if isinstance(packed, OneDnnChunk):
                qs.append(_onednn_weights(packed))
                scales.append(packed.scales.double())
                continue
            weight, _ = torch.ops.quantized.linear_unpack(packed)
            qs.append(weight.int_repr()[:, :-2])
            scales.append(weight.q_per_channel_scales())
    return torch.cat(qs), torch.cat(scales)


def _onednn_weights(chunk: OneDnnChunk) -> torch.Tensor:
    """The int8 rows of a oneDNN chunk: its product with the unit rows (u8 255 at one input,
    the zero point elsewhere; input step 1) is ``127 * q * scale`` in each output."""
    k, n = chunk.packed.shape  # the packed weight is [K, N]
    q = torch.empty(n, k, dtype=torch.int8)
    for start in range(0, k, UNIT_BLOCK):  # a block of inputs at a time: [block, N] out
        stop = min(start + UNIT_BLOCK, k)
        unit = torch.full((stop - start, k), X_ZERO, dtype=torch.uint8)
        unit[:, start:stop].fill_diagonal_(X_ZERO + 127)
        y = _onednn(unit, chunk, 1.0)
        q[:, start:stop] = torch.round(y.T / (127 * chunk.scales[:, None])).to(torch.int8)
    return q


def chunk_count(handle: int) -> int:
    return len(_PACKED[handle])


def packed_bytes(handle: int) -> int:
    """The memory `handle`'s chunks hold (`pack` counts it): ours and oneDNN's as their tensors;
    an FBGEMM matrix, whose packing does not say, as its int8 rows with the range columns and a
    per-row scale and column offset (12 bytes: fp64 and int32)."""
    return _BYTES[handle]


@torch.library.custom_op("tdllm::w8a8_linear", mutates_args=())
def w8a8_linear(scaled: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """`product` as a graph sees it (the eager path calls it directly)."""
    return product(scaled, handle)


@w8a8_linear.register_fake
def _w8a8_linear_shape(scaled: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return scaled.new_empty(scaled.shape[0], out_features)
