"""FBGEMM's packed int8 weights for W8A8 (`tdllm.model.quantized.Int8DynamicMethod`): packing
a projection's staged rows, the product, and reading the weights back for checks.

A large projection is packed as several row chunks of at most `CHUNK_BYTES`, each its own
FBGEMM matrix, packed on as many threads as torch uses: FBGEMM packs one matrix on one core,
and a whole 128k-row head at once took 2.9 s and a transient copy of itself (the 1B shape's
tied head, 0.26 GB). In chunks, each chunk's staged rows are scrubbed and freed as soon as
their quantized copy exists, so the transient is a chunk or two, and the head packs in 1.45 s
on 2 threads (docs/performance.md, "A faster GGUF header, W8A8 packed in chunks"). The
product runs the chunks one after another into one output: the same int32 sums per output,
so the same values as one matrix (tested), at the same speed (a chunk is still far larger
than a cache).

The packed matrices are not tensors of the layer: a failed load's scrub (`loader._zero`) does
not reach them; they are freed with the layer (a handle registered per layer), in TD memory
like the rest. A compiled decode step calls the product through the ``tdllm::w8a8_linear``
custom op (a graph takes tensors and numbers, not FBGEMM's packed objects).
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

# int8 weights per packed matrix: the 1B head in 4, the 8B head in 8. Not smaller: 32 MiB
# blocks fall under glibc's dynamic mmap threshold, so the freed staging stays in the heap
# (1B int4 load, measured: RSS after the load 1478 -> 1641-1659 MiB, the peak 1604 -> 1665)
CHUNK_BYTES = 64 << 20

_PACKED: dict[int, list[torch.ScriptObject]] = {}  # the chunks of each handle, in row order
_handles = itertools.count()


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
) -> int:
    """Pack the int8 row `chunks` (``[rows_i, K]`` each, per-row `scales` of all of them in
    order), calling `release` on each chunk once FBGEMM's input copy of it exists; a handle
    freed with `owner`."""
    starts = list(itertools.accumulate((c.shape[0] for c in chunks), initial=0))

    def one(i: int) -> torch.ScriptObject:
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

    workers = min(len(chunks), torch.get_num_threads())
    if workers > 1:  # each packing runs on one core with the GIL released
        with ThreadPoolExecutor(workers) as pool:
            packed = list(pool.map(one, range(len(chunks))))
    else:
        packed = [one(i) for i in range(len(chunks))]
    handle = next(_handles)
    _PACKED[handle] = packed
    weakref.finalize(owner, _PACKED.pop, handle, None)
    return handle


def product(scaled: torch.Tensor, handle: int) -> torch.Tensor:
    """``scaled [M, K]`` (fp32, every row in [-1, 1]) times the packed weights, fp32
    ``[M, N]``: FBGEMM's dynamic int8 GEMM, chunk by chunk."""
    chunks = _PACKED[handle]
    if len(chunks) == 1:
        return torch.ops.quantized.linear_dynamic(scaled, chunks[0])
    return torch.cat([torch.ops.quantized.linear_dynamic(scaled, c) for c in chunks], dim=1)


def unpack(handle: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [N, K] int8, scales [N] fp64)`` read back from the packed chunks."""
    qs, scales = [], []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        for packed in _PACKED[handle]:
            weight, _ = torch.ops.quantized.linear_unpack(packed)
            qs.append(weight.int_repr())
            scales.append(weight.q_per_channel_scales())
    return torch.cat(qs), torch.cat(scales)


def chunk_count(handle: int) -> int:
    return len(_PACKED[handle])


@torch.library.custom_op("tdllm::w8a8_linear", mutates_args=())
def w8a8_linear(scaled: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """`product` as a graph sees it (the eager path calls it directly)."""
    return product(scaled, handle)


@w8a8_linear.register_fake
def _w8a8_linear_shape(scaled: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return scaled.new_empty(scaled.shape[0], out_features)
