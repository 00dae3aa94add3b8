"""One-time pads over Z_2^32 for masked offload, and their products with the public weight.

Choice (docs/security.md, "masked"): exact Slalom-style pads. Each pad ``r`` is ``in`` words
drawn uniformly from Z_2^32 by the OS CSPRNG (`os.urandom`: getrandom, ChaCha20-based); the TD
precomputes ``u = r @ W.T mod 2^32`` itself, in batches, and spends each (r, u) exactly once:
``x~ = x + r`` goes to the device, ``y = y~ - u`` comes back. A uniform pad makes ``x~`` uniform
whatever ``x`` is: information-theoretic hiding, no computational assumption. The LPN-style
alternative ``r = s L + e`` (protection.md section 6) would cut the TD's cost to ``(k + t)/in``
of the GEMM, but rests on parameters nobody has reviewed, and at SmolLM2's widths (in = 576,
k = 384, t = 58) it would still cost 77% of the GEMM, so its saving does not pay for the risk
here. The price: the TD computes one full GEMM per pad (the device's work, again); batching
pads makes that a GEMM over `batch` rows instead of per-token GEMVs, and the service's engine
thread tops every pool up to `IDLE_RESERVE` rows while it has no request (`top_up`, one batch
per idle slice), so a request's first `IDLE_RESERVE` rows per projection find their pads ready.

Pads are consumed first-in first-out and deleted from the pool as they are taken; a pool never
hands out a row twice (`taken` counts them, tests check freshness).
"""

from __future__ import annotations

import os

import torch

from tdllm.trusted.masked_ring import RING, exact_product, wrap32

DEFAULT_BATCH = 32  # pads precomputed per refill: one [32, in] x [in, out] GEMM
# rows kept ready per projection in idle time: 64 x (in + out) words, ~66 MB for SmolLM2-135M
IDLE_RESERVE = 64


def random_words(rows: int, cols: int) -> torch.Tensor:
    """Uniform signed int32 words from the OS CSPRNG (torch's generators are not CSPRNGs)."""
    data = bytearray(os.urandom(rows * cols * 4))
    if not data:
        return torch.empty(rows, cols, dtype=torch.int32)
    return torch.frombuffer(data, dtype=torch.int32).reshape(rows, cols)


class PadPool:
    """Fresh (r, u = r W^T mod 2^32) pairs for one projection."""

    def __init__(self, weight_t64: list[torch.Tensor], batch: int = DEFAULT_BATCH) -> None:
        self.weight_t64 = weight_t64
        self.in_features = sum(c.shape[0] for c in weight_t64)
        self.batch = batch
        self._pads = torch.empty(0, self.in_features, dtype=torch.int32)
        self._products = torch.empty(0, weight_t64[0].shape[1], dtype=torch.int32)
        self.taken = 0
        self.generated = 0
        self.misses = 0  # takes that had to compute pads on the request's path

    def refill(self, rows: int) -> None:
        pads = random_words(rows, self.in_features)
        products = wrap32(exact_product(pads, self.weight_t64))
        self._pads = torch.cat([self._pads, pads])
        self._products = torch.cat([self._products, products])
        self.generated += rows

    @property
    def ready(self) -> int:
        """Unused pads in the pool."""
        return int(self._pads.shape[0])

    def top_up(self, reserve: int) -> bool:
        """Add one batch if fewer than `reserve` pads are ready; whether it did."""
        if self.ready >= reserve:
            return False
        self.refill(min(self.batch, reserve - self.ready))
        return True

    def take(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`rows` unused pads ``[rows, in]`` and their products ``[rows, out]`` (int32 words)."""
        missing = rows - self._pads.shape[0]
        if missing > 0:
            self.misses += 1
            self.refill(max(missing, self.batch))
        pads, products = self._pads[:rows], self._products[:rows]
        self._pads, self._products = self._pads[rows:].clone(), self._products[rows:].clone()
        self.taken += rows
        return pads, products


def mask(x_q: torch.Tensor, pads: torch.Tensor) -> torch.Tensor:
    """``x + r mod 2^32`` as int32 words."""
    return wrap32(x_q.to(torch.int64) + pads.to(torch.int64))


def unmask(y_full: torch.Tensor, products: torch.Tensor) -> torch.Tensor:
    """``y~ - u mod 2^32`` read as signed int32: the exact product when it is below 2^31."""
    return wrap32(torch.remainder(y_full, RING) - products.to(torch.int64))
