"""Rotary position embeddings (rotate-half RoPE, as Llama applies it): the tables, the
reference formula, and the four-op form the model runs (`rotate`, bit for bit the reference)."""

from __future__ import annotations

import torch


def rope_tables(head_dim: int, theta: float, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[max_pos, head_dim]`` for rotate-half RoPE, computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE as the reference writes it: ``x * cos + [-x2, x1] * sin``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """`sin` with the first half of its last dimension negated, for `rotate`."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
    """`apply_rope` with `signed_sin`'s table in four ops instead of seven, bit for bit:
    ``[x2, x1] * [-s1, s2]`` is ``[-x2, x1] * [s1, s2]`` (negation is exact)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed
