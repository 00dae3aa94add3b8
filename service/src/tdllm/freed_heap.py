"""Hand the heap's freed pages back to the kernel (glibc's ``malloc_trim``).

glibc raises its mmap threshold to the size of the largest block freed (up to 32 MiB) and then
keeps up to twice that much freed memory at the top of its heap. After a load that staged and
freed many projection-sized blocks, that is ~64 MiB resident for nothing; after the GGUF
header's parse, ~40 MiB (measured, docs/performance.md, "Peak RSS: the heap handed back").
Callers are the load and the split profile's drop of the prefix: points where much was just
freed, never a hot path (a full garbage collection runs first).

Importable from both sides of the trust boundary: it holds no model and no secret.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc: its allocator returns memory its own way
        return None


def return_freed_heap() -> None:
    """Collect garbage, then return the heap's free pages to the kernel (glibc only)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
