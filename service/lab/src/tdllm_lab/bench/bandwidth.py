"""The machine's memory read bandwidth, as a decode step sees it: a sum over a buffer far larger
than the caches, on torch's threads (the engine's), best of `repeats` (noise only adds time).
`tdllm bench --shape` runs it as ``python -m tdllm_lab.bench.bandwidth`` (prints GB/s), so the
1 GiB buffer never raises the peak RSS that its engine workers inherit."""

from __future__ import annotations

import sys
import time

import torch

BUFFER_BYTES = 1 << 30


def read_gb_s(nbytes: int = BUFFER_BYTES, repeats: int = 5) -> float:
    """GB/s (1e9 bytes) read by ``torch.sum`` over `nbytes` of fp32."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32)
    buffer.sum()  # pages in and warm
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def measured_in_subprocess() -> float:
    import subprocess

    done = subprocess.run(  # our own interpreter and module
        [sys.executable, "-m", "tdllm_lab.bench.bandwidth"], capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    return float(done.stdout.strip())


if __name__ == "__main__":
    print(read_gb_s())
