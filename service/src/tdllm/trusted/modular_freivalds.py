"""Freivalds checks of the device's ring products over prime fields (exact, no tolerance).

The device claims ``y = x~ @ W.T`` over the integers (int64) for masked words ``x~`` and the
public int8 ``W``. Checking that identity mod 2^32 would be the natural thing, and is unsound:
an error in the top bit survives a random check with probability 1/2 (protection.md L8a). So:

1. a range check: an honest ``|y|`` is at most ``B = 2^31 * 127 * in`` (`product_bound`);
2. Freivalds mod two 31-bit primes ``p1 = 2^31 - 1`` and ``p2 = 2^31 - 19``, two secret vectors
   each: ``(y @ s) mod p == (x~ @ (W.T @ s mod p)) mod p``.

Why it is sound: a forged row differs by an integer vector ``d != 0`` with ``|d_j| <= 2B <
p1 * p2`` (B < 2^53 at SmolLM2's widths, p1 p2 > 2^61), so some ``d_j`` is non-zero mod p1 or
mod p2; then each uniform secret vector mod that prime misses it with probability 1/p, and two
independent vectors with 1/p^2 < 2^-61. This holds per checked row whatever the device chose,
including errors in the high bits or multiples of one prime. The vectors come from the OS
CSPRNG, never cross, and are re-drawn after a failure (a device probing them learns at most
one abort). Arithmetic stays in int64: residues < 2^31, their products < 2^62.

Cost per checked row: 4 (in + out) modular multiply-adds, against in * out MACs of the GEMM.
"""

from __future__ import annotations

import os

import torch

from tdllm.trusted.masked_ring import product_bound

PRIMES = (2_147_483_647, 2_147_483_629)
VECTORS_PER_PRIME = 2
ROW_CHUNK = 64  # rows checked at a time: bounds the [rows, out, 4] int64 temporary


def _uniform_below(primes: torch.Tensor, rows: int) -> torch.Tensor:
    """``[rows, len(primes)]`` int64 uniform in ``[0, p)`` per column (rejection-free: 62-bit
    words mod a 31-bit prime have bias < 2^-31)."""
    words = torch.frombuffer(bytearray(os.urandom(rows * len(primes) * 8)), dtype=torch.int64)
    words = words.reshape(rows, len(primes)) & ((1 << 62) - 1)
    return torch.remainder(words, primes[None, :])


class ModularFreivalds:
    def __init__(self, weight_q: torch.Tensor) -> None:
        """`weight_q`: the TD's copy of the int8 public weight ``[out, in]`` the device holds."""
        self.weight_q = weight_q
        self.bound = product_bound(weight_q.shape[1])
        self.primes = torch.tensor(
            [p for p in PRIMES for _ in range(VECTORS_PER_PRIME)], dtype=torch.int64
        )
        self.checked_rows = 0
        self.new_epoch()

    def new_epoch(self) -> None:
        """Fresh secret vectors ``s[out, 4]`` and ``v = W.T @ s mod p`` ``[in, 4]``."""
        self._s = _uniform_below(self.primes, self.weight_q.shape[0])
        # W.T @ s exactly, as two float64 GEMMs on 16-bit halves of s (sums < 127 * 2^16 * out
        # < 2^53): int64 matmul has no BLAS path and costs ~10x more
        w_t = self.weight_q.T.to(torch.float64)
        high = (w_t @ (self._s >> 16).to(torch.float64)).to(torch.int64)
        low = (w_t @ (self._s & 0xFFFF).to(torch.float64)).to(torch.int64)
        p = self.primes[None, :]
        self._v = torch.remainder(torch.remainder(high, p) * (1 << 16) + low, p)

    def _dot_mod(self, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``(a @ s) mod p`` per column for int64 ``a[n, m]``, residues ``s[m, 4]``."""
        p = self.primes
        out = []
        for start in range(0, a.shape[0], ROW_CHUNK):
            rows = torch.remainder(a[start : start + ROW_CHUNK, :, None], p)
            terms = torch.remainder(rows * s[None], p)
            out.append(torch.remainder(terms.sum(dim=1), p))
        return torch.cat(out) if out else torch.empty(0, len(p), dtype=torch.int64)

    def verify(self, x_masked: torch.Tensor, y: torch.Tensor) -> bool:
        """True iff every row of the claimed integer product passes (never raises)."""
        out_f, in_f = self.weight_q.shape
        if x_masked.dim() != 2 or y.dim() != 2 or x_masked.shape[0] != y.shape[0]:
            return False
        if x_masked.shape[1] != in_f or y.shape[1] != out_f or y.dtype != torch.int64:
            return False
        self.checked_rows += y.shape[0]
        # compare, never abs(): abs(-2^63) overflows to itself and would pass
        if not bool(((y >= -self.bound) & (y <= self.bound)).all()):
            return False
        left = self._dot_mod(y, self._s)
        right = self._dot_mod(x_masked.to(torch.int64), self._v)
        return bool(torch.equal(left, right))
