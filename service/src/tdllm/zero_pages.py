"""Memory that reads as zeros and holds physical pages only where it has been written.

A KV cache must offer every slot its whole context, yet a slot mostly holds a short sequence.
Rather than paging the cache in software (block tables, a gather in every attention call), the
cache is one anonymous mapping of its full size: the kernel gives it physical pages on first
write, 4 KiB at a time, and takes them back when a finished sequence's range is released
(`ZeroPages.release`). Attention keeps reading one contiguous view per layer, as before; only
written pages cost memory (the design of vAttention, Prabhu et al., ASPLOS 2025).

The mapping is also marked so that the keys and values of running prompts stay out of core
dumps (``MADV_DONTDUMP``) and so that transparent huge pages, which would commit 2 MiB on a
one-token write, are never used for it (``MADV_NOHUGEPAGE``).

Importable from both sides of the trust boundary: it holds no model and no secret of its own.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch

# Linux's MAP_NORESERVE (the same on x86-64 and arm64; Python 3.11's mmap does not name it): the
# full size is address space, not a commitment, so a mapping larger than RAM is not refused by
# the kernel's overcommit heuristic (vm.overcommit_memory 0). Under strict accounting (2) it is
# still counted in full: there the cache's whole size must fit the commit limit.
MAP_NORESERVE = 0x4000
PAGE = mmap.PAGESIZE


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
        """A contiguous `shape` of `dtype` at byte `offset` (a multiple of the dtype's size)."""
        count = 1
        for size in shape:
            count *= size
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        return self.bytes[offset : offset + nbytes].view(dtype).view(shape)

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
        """Bytes of this mapping now in RAM (its `Rss` in /proc/self/smaps; pages only read
        map the kernel's shared zero page and do not count). Linux only; for tests and benches,
        not for a hot path (it reads the whole smaps file)."""
        start, end = self.address, self.address + self.nbytes
        return sum(
            int(fields["Rss:"][0]) * 1024
            for lo, hi, fields in _mappings()
            if lo < end and hi > start and "Rss:" in fields
        )

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
