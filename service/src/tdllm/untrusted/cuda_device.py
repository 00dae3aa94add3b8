"""The GPU primitives of the `cuda` device (`device.InProcessDevice`, kind ``cuda``).

The only module that may touch `torch.cuda` (ruff banned-api; tests/protection/
test_import_contracts.py). It imports nothing from `tdllm`: the device class lives in
`device.py` and calls these, so the two modules do not import each other.
"""

from __future__ import annotations

import torch


def cuda_available() -> bool:
    return bool(torch.cuda.is_available())


def synchronize() -> None:
    """Wait for the GPU work queued so far (the weights copied in by `load`)."""
    torch.cuda.synchronize()


def empty_cache() -> None:
    """Give the caching allocator's free GPU memory back (after `close`)."""
    torch.cuda.empty_cache()
