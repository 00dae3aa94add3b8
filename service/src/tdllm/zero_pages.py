"""Memory that reads as zeros and holds physical pages only where it has been written.

A KV cache must offer every slot its whole context, yet a slot mostly holds a short sequence.
Rather than paging the cache in software (block tables, a gather in every attention call), the
cache is one anonymous mapping of its full size: the kernel gives it physical pages on first
write, 4 KiB at a time, and takes them back when a finished sequence's range is released
(`ZeroPages.release`). Attention keeps reading one contiguous view per layer, as before; only
written pages cost memory (the design of vAttention, Prabhu et al., ASPLOS 2025).

The mapping is also marked so that the keys and values of running prompts stay out of core
dumps (``MADV_DONTDUMP``) and so that transparent huge pages, which may commit 2 MiB on a
one-token write, are never used for it (``MADV_NOHUGEPAGE``).

Importable from both sides of the trust boundary: it holds no model and no secret of its own.
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import torch

# Linux's MAP_NORESERVE (the same on x86-64 and arm64; Python 3.11's mmap does not name it): the
# full size is address space, not a commitment, so a mapping larger than RAM is not refused by
# the kernel's overcommit heuristic (vm.overcommit_memory 0). Under strict accounting (2) it is
# still counted in full: there the cache's whole size must fit the commit limit.
MAP_NORESERVE = 0x4000
PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)


class ZeroPages:
    """`nbytes` of zero-filled anonymous memory, committed page by page as it is written."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(nbytes, 1)
        self._map = mmap.mmap(
            -1,
            self.nbytes,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        self._map.madvise(mmap.MADV_NOHUGEPAGE)
        self._map.madvise(mmap.MADV_DONTDUMP)
        # torch.frombuffer holds a reference to the map: the memory lives as long as any view
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self.address = self.bytes.data_ptr()

    def tensor(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous `shape` of `dtype` at byte `offset` (a multiple of the dtype's size).
        A storage of its own, not a view of `bytes`: autograd counts in-place writes per
        storage, so a write to one tensor must not invalidate another's saved reads."""
        count = _nbytes(shape, dtype) // dtype.itemsize
        return torch.frombuffer(self._map, dtype=dtype, count=count, offset=offset).view(shape)

    def release(self, offset: int, length: int) -> None:
        """Make bytes ``[offset, offset + length)`` read as zeros again, handing their whole
        pages back to the kernel. The partial pages at either end are shared with neighbouring
        ranges (another slot's keys): those bytes are zeroed in place instead."""
        end = offset + length
        first = -(-offset // PAGE) * PAGE  # the first whole page, and the end of the last
        last = end // PAGE * PAGE
        if first >= last:
            self._zero(offset, end)
            return
        self._zero(offset, first)
        self._zero(last, end)
        self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def _zero(self, start: int, end: int) -> None:
        piece = self.bytes[start:end]
        if piece.any():  # a write would commit a page that only reads as zeros
            piece.zero_()

    def resident_bytes(self) -> int:
        """Bytes of this mapping mapped to memory now (mincore(2): pages written, and pages
        only read, which map the kernel's one shared zero page and cost nothing, count too).
        Linux only; for tests and benches, not for a hot path."""
        pages = -(-self.nbytes // PAGE)
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(self.address), ctypes.c_size_t(self.nbytes), vec):
            raise OSError(ctypes.get_errno(), "mincore failed")
        return int(torch.frombuffer(vec, dtype=torch.uint8).bitwise_and(1).sum()) * PAGE

    def flags(self) -> set[str]:
        """The kernel's VmFlags of this mapping (``dd``: left out of core dumps; ``nh``: no
        huge pages)."""
        for lo, hi, fields in _mappings():
            if lo <= self.address < hi:
                return set(fields.get("VmFlags:", []))
        return set()


def _mappings() -> list[tuple[int, int, dict[str, list[str]]]]:
    """This process's mappings from /proc/self/smaps: (start, end, their fields by name)."""
    out: list[tuple[int, int, dict[str, list[str]]]] = []
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head, *rest = line.split()
        if head.endswith(":"):
            out[-1][2][head] = rest
        else:  # a mapping's header: start-end perms offset device inode [path]
            lo, hi = (int(x, 16) for x in head.split("-"))
            out.append((lo, hi, {}))
    return out


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.zeros(shape)`` whose memory, on the CPU, is committed only where written (a
    cache sized for the worst case); on an accelerator, plain zeros."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return ZeroPages(_nbytes(shape, dtype)).tensor(0, shape, dtype)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * dtype.itemsize
