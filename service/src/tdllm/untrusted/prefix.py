"""The public prefix: embedding plus Llama blocks ``0..num_layers-1``, on public weights only.

This is the code an untrusted device runs. It may not import `tdllm.model` (the boundary rule),
so it restates the block math here, op for op in the same order as `model/transformer.py`
(same fused q|k|v and gate|up GEMMs, same RMSNorm casts, same attention call): on the same CPU
its output is then bit-identical to the TD's own `Transformer.forward_blocks`, which is what
makes bit-exact re-execution audits possible. `tests/protection` checks that equality.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tdllm.zero_pages import lazy_zeros

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
DTYPES = {"torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PrefixShape:
    """Everything the device needs to know about the model: public hyper-parameters only."""

    num_layers: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_batch: int
    max_seq_len: int
    rope_positions: int  # the model's max_position_embeddings: same table, same rounding
    dtype: str  # "torch.float32" or "torch.bfloat16"
    keep_gemm_io: bool = False  # keep the last step's projection inputs/outputs (Freivalds)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def weight_names(self) -> list[str]:
        """Hugging Face names of every tensor the prefix holds."""
        names = ["model.embed_tokens.weight"]
        for i in range(self.num_layers):
            p = f"model.layers.{i}"
            names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
            names += [f"{p}.self_attn.{n}.weight" for n in (*QKV, "o_proj")]
            names += [f"{p}.mlp.{n}.weight" for n in (*GATE_UP, "down_proj")]
        return names


class PublicPrefix:
    """Prefix weights (q|k|v and gate|up fused, as the TD model fuses them) and a KV cache."""

    def __init__(
        self, shape: PrefixShape, weights: dict[str, torch.Tensor], device: str = "cpu"
    ) -> None:
        self.shape = shape
        self.device = torch.device(device)
        dtype = shape.torch_dtype
        missing = sorted(set(shape.weight_names()) - set(weights))
        if missing:
            raise ValueError(f"public prefix lacks {missing[:3]}")
        self.weights: dict[str, torch.Tensor] = {}
        self.fused_from: dict[str, tuple[str, ...]] = {}
        for i in range(shape.num_layers):
            p = f"model.layers.{i}"
            self._fuse(
                weights,
                f"{p}.self_attn.qkv_proj.weight",
                [f"{p}.self_attn.{n}.weight" for n in QKV],
            )
            self._fuse(
                weights, f"{p}.mlp.gate_up_proj.weight", [f"{p}.mlp.{n}.weight" for n in GATE_UP]
            )
        for name in shape.weight_names():
            if not name.endswith(tuple(f"{n}.weight" for n in (*QKV, *GATE_UP))):
                self.weights[name] = weights[name].to(self.device, dtype).contiguous()
        cache_shape = (shape.max_batch, shape.num_kv_heads, shape.max_seq_len, shape.head_dim)
        # sized for every slot's whole context; on the CPU only written positions take memory
        self.k = [lazy_zeros(cache_shape, dtype, self.device) for _ in range(shape.num_layers)]
        self.v = [lazy_zeros(cache_shape, dtype, self.device) for _ in range(shape.num_layers)]
        cos, sin = _rope_tables(shape.head_dim, shape.rope_theta, shape.rope_positions)
        self.rope_cos, self.rope_sin = cos.to(self.device, dtype), sin.to(self.device, dtype)
        self.native_bf16 = bool(
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        )
        # With `keep_gemm_io`, the inputs and outputs of every projection of the last `run`,
        # by weight name, so the TD can Freivalds-check any of them after the fact (it picks
        # which only once the step is done). Off by default: it pins the step's activations.
        self.keep_gemm_io = shape.keep_gemm_io
        self.gemm_io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _fuse(self, weights: dict[str, torch.Tensor], fused: str, parts: list[str]) -> None:
        dtype = self.shape.torch_dtype
        self.weights[fused] = torch.cat([weights[n].to(dtype) for n in parts]).to(self.device)
        self.fused_from[fused] = tuple(parts)

    def held_weights(self) -> dict[str, torch.Tensor]:
        """Every weight resident on the device, under its checkpoint name (fused ones split)."""
        out: dict[str, torch.Tensor] = {}
        for name, tensor in self.weights.items():
            parts = self.fused_from.get(name)
            if parts is None:
                out[name] = tensor
                continue
            sizes = [self._rows(n) for n in parts]
            out |= dict(zip(parts, tensor.split(sizes), strict=True))
        return out

    def _rows(self, name: str) -> int:
        s = self.shape
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            return s.num_kv_heads * s.head_dim
        if name.endswith("q_proj.weight"):
            return s.num_heads * s.head_dim
        return s.intermediate_size

    def held_caches(self) -> dict[str, torch.Tensor]:
        return {
            f"kv.{i}.{kind}": t
            for i in range(self.shape.num_layers)
            for kind, t in (("k", self.k[i]), ("v", self.v[i]))
        }

    def gemm_io_of(self, names: list[str]) -> dict[str, torch.Tensor]:
        """``NAME:x`` and ``NAME:y`` of the last run for each projection weight NAME asked for."""
        if not self.keep_gemm_io:
            raise RuntimeError("this prefix was loaded without keep_gemm_io")
        out: dict[str, torch.Tensor] = {}
        for name in names:
            x, y = self.gemm_io[name]
            out[f"{name}:x"], out[f"{name}:y"] = x, y
        return out

    @torch.inference_mode()
    def run(self, tokens: torch.Tensor, slots: list[int], starts: list[int]) -> torch.Tensor:
        """Hidden states ``[B, T, hidden]`` after the prefix for `tokens` ``[B, T]``."""
        steps = _Steps(slots, starts, tokens.shape[1], self.device)
        self.gemm_io = {}
        x = F.embedding(tokens.to(self.device), self.weights["model.embed_tokens.weight"])
        cos = self.rope_cos[steps.positions][:, None]
        sin = self.rope_sin[steps.positions][:, None]
        for i in range(self.shape.num_layers):
            x = self._block(i, x, steps, cos, sin)
        return x

    def _block(
        self, i: int, x: torch.Tensor, steps: _Steps, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        p, s, w = f"model.layers.{i}", self.shape, self.weights
        h = self._norm(x, w[f"{p}.input_layernorm.weight"])
        B, T, _ = h.shape
        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        q, k, v = self._linear(h, f"{p}.self_attn.qkv_proj.weight").split(
            [q_size, kv_size, kv_size], dim=-1
        )
        q = q.view(B, T, s.num_heads, s.head_dim).transpose(1, 2)
        k = k.view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        steps.write(self.k[i], k)
        steps.write(self.v[i], v)
        keys, values = steps.read(self.k[i]), steps.read(self.v[i])
        if T == 1:  # as the TD's `decode_attention`: query heads grouped under their key head
            grouped = q.view(B, s.num_kv_heads, s.num_heads // s.num_kv_heads, s.head_dim)
            y = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=steps.mask)
            y = y.reshape(B, s.num_heads, 1, s.head_dim)  # a GPU kernel may return it strided
        else:
            y = F.scaled_dot_product_attention(
                q,
                keys,
                values,
                attn_mask=steps.mask,
                is_causal=steps.causal,
                enable_gqa=s.num_heads != s.num_kv_heads,
            )
        x = x + self._linear(y.transpose(1, 2).reshape(B, T, -1), f"{p}.self_attn.o_proj.weight")
        h = self._norm(x, w[f"{p}.post_attention_layernorm.weight"])
        gate, up = self._linear(h, f"{p}.mlp.gate_up_proj.weight").split(
            s.intermediate_size, dim=-1
        )
        return x + self._linear(F.silu(gate) * up, f"{p}.mlp.down_proj.weight")

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.shape.rms_norm_eps)
        return weight * x32.to(x.dtype)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        y = self._matmul(x, self.weights[name])
        if self.keep_gemm_io:
            self.gemm_io[name] = (x, y)
        return y

    def _matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # the TD's PlainCpuMethod widens bf16 to fp32 on CPUs without native bf16; do the same
        slow_bf16 = weight.dtype == torch.bfloat16 and not self.native_bf16
        if slow_bf16 and self.device.type == "cpu" and x.numel() // x.shape[-1] >= 8:
            return _widened_bf16_linear(x, weight)
        return F.linear(x, weight)


class _Steps:
    """Positions, mask and cache access for one call, exactly as the TD model's `Batch`."""

    def __init__(
        self, slots: list[int], starts: list[int], num_tokens: int, device: torch.device
    ) -> None:
        if not (len(slots) == len(starts) >= 1) or (num_tokens > 1 and len(slots) != 1):
            raise ValueError("one multi-token sequence, or many one-token sequences")
        self.slots, self.starts, self.num_tokens = slots, starts, num_tokens
        self.span = max(starts) + num_tokens
        lo = slots[0]
        contiguous = slots == list(range(lo, lo + len(slots)))
        self.slot_range = slice(lo, lo + len(slots)) if contiguous else None
        self.slot_index = torch.tensor(slots, device=device)
        self.positions = (torch.tensor(starts)[:, None] + torch.arange(num_tokens)).to(device)
        self.causal = len(slots) == 1 and starts[0] == 0
        self.mask: torch.Tensor | None = None
        if not self.causal:
            keys = torch.arange(self.span, device=device)
            self.mask = (keys[None, None, None, :] <= self.positions[:, None, :, None]).contiguous()

    def write(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        if self.num_tokens == 1:
            starts = torch.tensor(self.starts, device=cache.device)
            cache[self.slot_index, :, starts] = new[:, :, 0]
        else:
            s, p = self.slots[0], self.starts[0]
            cache[s, :, p : p + self.num_tokens] = new[0]

    def read(self, cache: torch.Tensor) -> torch.Tensor:
        if self.slot_range is not None:
            return cache[self.slot_range, :, : self.span]
        return cache[:, :, : self.span].index_select(0, self.slot_index)


def _rope_tables(head_dim: int, theta: float, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _widened_bf16_linear(
    x: torch.Tensor, weight: torch.Tensor, block_rows: int = 2048
) -> torch.Tensor:
    x32 = x.float()
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.bfloat16)
    block = torch.empty(min(block_rows, weight.shape[0]), weight.shape[1])
    for start in range(0, weight.shape[0], block_rows):
        rows = weight[start : start + block_rows]
        widened = block[: rows.shape[0]]
        widened.copy_(rows)
        out[..., start : start + rows.shape[0]] = F.linear(x32, widened)
    return out
