"""Freivalds spot checks of the device's GEMMs: is ``y == x @ W.T`` for a projection it ran?

Why: a re-execution audit costs the TD the whole prefix for every audited request. Checking a
claimed product costs two dot products per row: with a secret vector ``s`` (per projection, per
epoch) and ``v = W.T @ s`` precomputed once, ``y @ s`` must equal ``x @ v``. The TD asks for the
inputs/outputs of projections only after the step returned, so a device cannot know which of its
products will be checked and must keep (and compute) all of them honestly.

Entries of ``s`` are ``±U(1, 2)``: any single wrong output entry shifts ``y @ s`` by at least its
own error, so every forgery above the rounding tolerance is caught (probability 1, not 1 - 1/|S|);
several wrong entries escape only if they cancel against the secret ``s``. Floating point needs a
tolerance: fp32 rounding of a product ``y_i`` is a random walk of ``in`` terms of size ``eps *
|x||W_i|``, so the check allows ``factor * eps * sqrt(in) * ||x_r|| * ||s * ||W_i|| ||`` per row;
forgeries below that are invisible (calibrated per device kind: device_rounding.py, reported in
docs/security.md). The TD computes in fp64, so its own arithmetic adds nothing. On any failure
the epoch's vectors are re-drawn. `max_ratio` keeps the largest honest residual seen, in units
of the bound without its factor (how the factors were measured: `tdllm bench tolerance`).
"""

from __future__ import annotations

import math
import secrets

import torch

from tdllm.trusted.errors import DeviceIntegrityError

DEFAULT_FACTOR = 0.25  # honest fp32 SmolLM2 products measured at <= 0.012 (docs/security.md)


class FreivaldsCheck:
    def __init__(
        self, weights: dict[str, torch.Tensor], rate: float, factor: float = DEFAULT_FACTOR
    ) -> None:
        """`weights`: the TD's own copies of the device's projection weights, by device name."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("the Freivalds rate is a probability")
        self.weights, self.rate, self.factor = weights, rate, factor
        self._coin = secrets.SystemRandom()
        self.checked = 0
        self.max_ratio = 0.0
        self.new_epoch()

    def new_epoch(self) -> None:
        """Fresh secret vectors (lazily derived per projection) from the OS CSPRNG."""
        self._generator = torch.Generator().manual_seed(secrets.randbits(63))
        self._vectors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def sample(self) -> list[str]:
        """Projections to check after this step: all of them with probability `rate`, else none.

        All of them, because checking costs O(in + out) per row against the GEMM's O(in * out);
        what a checked step really costs is the bytes of every projection's x and y crossing.
        """
        return sorted(self.weights) if self._coin.random() < self.rate else []

    def _vector(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        if name not in self._vectors:
            w = self.weights[name].double()
            out = w.shape[0]
            sign = torch.randint(0, 2, (out,), generator=self._generator).double() * 2 - 1
            s = sign * (1 + torch.rand(out, generator=self._generator, dtype=torch.float64))
            scale = float((s * w.norm(dim=1)).norm())
            self._vectors[name] = (s, w.T @ s, scale)
        return self._vectors[name]

    def verify(self, name: str, x: torch.Tensor, y: torch.Tensor) -> bool:
        """True iff every row of the claimed product passes (no exception: for measuring)."""
        ratio = self.residual_ratio(name, x, y)
        if ratio is None:
            return False
        self.max_ratio = max(self.max_ratio, ratio)
        return ratio <= self.factor

    def residual_ratio(self, name: str, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """The worst row's ``|y @ s - x @ v|`` over the rounding bound with factor 1; None for a
        product of the wrong shape or with a non-finite entry (never acceptable)."""
        w = self.weights[name]
        if x.shape[-1] != w.shape[1] or y.shape[-1] != w.shape[0] or x.shape[:-1] != y.shape[:-1]:
            return None
        s, v, scale = self._vector(name)
        x64 = x.reshape(-1, x.shape[-1]).double()
        y64 = y.reshape(-1, y.shape[-1]).double()
        if not (torch.isfinite(x64).all() and torch.isfinite(y64).all()):
            return None
        eps = torch.finfo(y.dtype).eps
        bound = eps * math.sqrt(w.shape[1]) * x64.norm(dim=1).clamp_min(1e-300) * scale
        ratio = float(((y64 @ s - x64 @ v).abs() / bound).amax())
        return ratio if math.isfinite(ratio) else None

    def check(self, io: dict[str, torch.Tensor], names: list[str]) -> None:
        """Raise `DeviceIntegrityError` (and re-draw the vectors) unless every product holds."""
        for name in names:
            x, y = io.get(f"{name}:x"), io.get(f"{name}:y")
            self.checked += 1
            if x is None or y is None or not self.verify(name, x, y):
                self.new_epoch()
                raise DeviceIntegrityError(
                    f"Freivalds check failed: the device's product for {name} is not x @ W.T; "
                    "serving through it is stopped"
                )
