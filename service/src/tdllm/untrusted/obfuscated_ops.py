"""Device side of the `obfuscated` profile (seed 000): products with padded, permuted weights.

The TD puts, per layer, weights it has scaled, padded with decoy rows and permuted; this module
only multiplies with them, so it learns the padded weights, the inputs (plaintext activations)
and its own padded outputs, all of which are published. Two ops:

- `linear`: ``y = x @ W.T`` for one resident obfuscated weight (the TD restores the real rows).
- `attention_scores`: the fused q|k|v product of one layer; q and k (heads padded with decoy
  RoPE pairs) are rotated with the per-pair frequencies the TD put, k is appended to a key
  cache kept here, and the padded scores ``q·kᵀ`` (decoy terms included, unscaled, fp32) come
  back with the obfuscated v rows. The TD subtracts the decoy scores it computes itself.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

from tdllm.untrusted.offload import offload_op
from tdllm.zero_pages import lazy_zeros


@offload_op
def linear(
    resident: Mapping[str, torch.Tensor], args: dict[str, torch.Tensor], params: dict[str, Any]
) -> dict[str, torch.Tensor]:
    weight = resident[str(params["weight"])]
    return {"y": args["x"].to(weight.dtype) @ weight.T}


@offload_op
def attention_scores(
    resident: Mapping[str, torch.Tensor], args: dict[str, torch.Tensor], params: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Padded scores ``[B, heads, T, span]`` and obfuscated v ``[B, T, v_rows]`` of one layer.

    params: ``layer`` (resident prefix: ``.qkv`` weight, ``.inv_freq`` ``[kv_heads, dim/2]``),
    ``heads``, ``kv_heads``, ``dim`` (padded head dim), ``slots``, ``starts``, ``max_batch``,
    ``max_seq``.
    """
    layer = str(params["layer"])
    heads, kv_heads, dim = int(params["heads"]), int(params["kv_heads"]), int(params["dim"])
    slots, starts = [int(s) for s in params["slots"]], [int(s) for s in params["starts"]]
    weight, inv_freq = resident[f"{layer}.qkv"], resident[f"{layer}.inv_freq"]
    x = args["x"].to(weight.dtype)
    B, T, _ = x.shape
    out = x @ weight.T
    q_rows, k_rows = heads * dim, kv_heads * dim
    q = out[..., :q_rows].float().view(B, T, heads, dim).transpose(1, 2)
    k = out[..., q_rows : q_rows + k_rows].float().view(B, T, kv_heads, dim).transpose(1, 2)
    v = out[..., q_rows + k_rows :]

    positions = torch.tensor(starts, device=x.device)[:, None] + torch.arange(T, device=x.device)
    angles = positions[:, None, :, None].float() * inv_freq.float()[None, :, None, :]
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1)  # [B, kv_heads, T, dim]
    sin = torch.cat((angles.sin(), angles.sin()), dim=-1)
    group = heads // kv_heads
    q = _rope(q, cos.repeat_interleave(group, dim=1), sin.repeat_interleave(group, dim=1))
    k = _rope(k, cos, sin)

    cache = _key_cache(resident, layer, params, kv_heads, dim, x.device)
    index = torch.tensor(slots, device=x.device)
    if T == 1:
        cache[index, :, torch.tensor(starts, device=x.device)] = k[:, :, 0]
    else:
        cache[slots[0], :, starts[0] : starts[0] + T] = k[0]
    span = max(starts) + T
    keys = cache[:, :, :span].index_select(0, index).repeat_interleave(group, dim=1)
    return {"scores": q @ keys.transpose(-1, -2), "v": v}


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _key_cache(
    resident: Mapping[str, torch.Tensor],
    layer: str,
    params: dict[str, Any],
    kv_heads: int,
    dim: int,
    device: torch.device,
) -> torch.Tensor:
    """This layer's padded key cache, allocated here on first use (zeros: nothing to send)."""
    name = f"{layer}.kcache"
    shape = (int(params["max_batch"]), kv_heads, int(params["max_seq"]), dim)
    cache = resident.get(name)
    if cache is None or tuple(cache.shape) != shape:
        if not isinstance(resident, MutableMapping):
            raise RuntimeError("this device cannot keep a key cache")
        cache = resident[name] = lazy_zeros(shape, torch.float32, device)
    return cache
