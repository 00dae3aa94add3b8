"""Ring arithmetic of the `masked` profile: int8 weights, fixed-point activations, Z_2^32 words.

Quantization (both deterministic, so the device's int8 weight is a public function of the
public checkpoint, and the TD's reference path reproduces the masked path bit for bit):

- weights: symmetric per output row, ``w_q = round(w / s_w)``, ``s_w = max|w_row| / 127``;
- activations: symmetric per token row, ``x_q = round(x / s_x)``, ``s_x = max|x_row| / x_max``
  with ``x_max = floor((2^31 - 1) / (127 * in))`` (capped at 2^15): then every true product
  ``|x_q @ w_q.T| <= 127 * x_max * in < 2^31``, so the product mod 2^32 read as a signed int32
  IS the integer product, and unmasking is exact. SmolLM2's widths give x_max = 29 356 (in =
  576) and 11 008 (in = 1536): W8A15 / W8A14-class fixed point.
"""

from __future__ import annotations

import torch

RING = 1 << 32
X_MAX_CAP = (1 << 15) - 1
EXACT_CHUNK = 1 << 15  # float64 sums of 2^31 * 127 * chunk terms stay below 2^53


def x_max_for(in_features: int) -> int:
    return min(X_MAX_CAP, (2**31 - 1) // (127 * in_features))


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 ``[out, in]``, fp64 per-row scale ``[out]``) of a float weight."""
    w = weight.to(torch.float64)
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float64) * scale[:, None]


def quantize_activation(x: torch.Tensor, x_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 ``[n, in]``, fp64 per-row scale ``[n]``) of float rows ``x[n, in]``."""
    x64 = x.to(torch.float64)
    scale = x64.abs().amax(dim=1).clamp_min(1e-30) / x_max
    q = torch.round(x64 / scale[:, None]).clamp_(-x_max, x_max).to(torch.int32)
    return q, scale


def wrap32(words: torch.Tensor) -> torch.Tensor:
    """Integers (int64) reduced mod 2^32 into signed int32 words (two's complement)."""
    low = torch.remainder(words.to(torch.int64), RING)
    return torch.where(low >= RING // 2, low - RING, low).to(torch.int32)


def exact_product(x: torch.Tensor, weight_t64: list[torch.Tensor]) -> torch.Tensor:
    """``x @ W.T`` over the integers (int64) for int32 ``x`` and W given as float64 chunks of
    ``W.T`` (`wide_chunks`); exact while every |x| <= 2^31 (see `EXACT_CHUNK`)."""
    total = torch.zeros(x.shape[0], weight_t64[0].shape[1], dtype=torch.int64)
    for i, chunk in enumerate(weight_t64):
        part = x[:, i * EXACT_CHUNK : (i + 1) * EXACT_CHUNK].to(torch.float64) @ chunk
        total += part.to(torch.int64)
    return total


def wide_chunks(q: torch.Tensor) -> list[torch.Tensor]:
    """float64 ``W.T`` in row chunks of `EXACT_CHUNK` input features, for `exact_product`."""
    return [
        q[:, i : i + EXACT_CHUNK].to(torch.float64).T.contiguous()
        for i in range(0, q.shape[1], EXACT_CHUNK)
    ]


def product_bound(in_features: int) -> int:
    """The largest |x~ @ W.T| an honest device can return for words |x~| <= 2^31, int8 W."""
    return (1 << 31) * 127 * in_features
