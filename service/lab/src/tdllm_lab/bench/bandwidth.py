"""The machine's memory read bandwidth, as a decode step sees it: the faster of two reads of a
buffer far larger than the caches, on torch's threads (the engine's), best of `repeats` (noise
only adds time). Two readers, because the limit is what the fastest kernel reaches: ``torch.sum``
alone read 21.0 GB/s on the Intel Xeon where an fp32 GEMV over the same bytes read 25.5, and a
decode step's share of the slower one overstated it by ~10% (docs/performance.md).
`tdllm bench --shape` runs it as ``python -m tdllm_lab.bench.bandwidth`` (prints GB/s), so the
1 GiB buffer never raises the peak RSS that its engine workers inherit."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

BUFFER_BYTES = 1 << 30
GEMV_COLUMNS = 4096  # a weight row of a 1B-8B model's width


def read_gb_s(nbytes: int = BUFFER_BYTES, repeats: int = 5) -> float:
    """GB/s (1e9 bytes) read over `nbytes` of fp32 by the faster of ``torch.sum`` and an fp32
    GEMV (``torch.mv``, the buffer as a matrix of `GEMV_COLUMNS` columns)."""
    return max(readers(nbytes, repeats).values())


def readers(nbytes: int = BUFFER_BYTES, repeats: int = 5) -> dict[str, float]:
    """GB/s of each reader, by name."""
    columns = min(GEMV_COLUMNS, max(1, nbytes // 4))
    buffer = torch.ones(nbytes // 4 // columns, columns, dtype=torch.float32)
    vector = torch.ones(columns, dtype=torch.float32)
    reads: dict[str, Callable[[], torch.Tensor]] = {
        "sum": buffer.sum,
        "gemv": lambda: torch.mv(buffer, vector),
    }
    return {name: buffer.nbytes / _best(read, repeats) / 1e9 for name, read in reads.items()}


def _best(read: Callable[[], torch.Tensor], repeats: int) -> float:
    read()  # pages in and warm
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - start)
    return best


def measured_in_subprocess() -> float:
    import subprocess

    done = subprocess.run(  # our own interpreter and module
        [sys.executable, "-m", "tdllm_lab.bench.bandwidth"], capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    return float(done.stdout.strip())


if __name__ == "__main__":
    print(read_gb_s())
