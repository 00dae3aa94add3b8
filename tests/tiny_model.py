"""A tiny random Llama (a few layers, made in memory) for fast model and engine tests."""

from __future__ import annotations

import torch

from tdllm.model.config import ModelConfig
from tdllm.model.linear import LinearMethodTable
from tdllm.model.transformer import Transformer

TINY = ModelConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def tiny_tensors(cfg: ModelConfig = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hugging Face-named random weights for `cfg`."""
    g = torch.Generator().manual_seed(seed)
    h, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    q = cfg.num_heads * cfg.head_dim

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    out = {"model.embed_tokens.weight": rnd(cfg.vocab_size, h), "model.norm.weight": 1 + rnd(h)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = rnd(cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        out |= {
            f"{p}.input_layernorm.weight": 1 + rnd(h),
            f"{p}.post_attention_layernorm.weight": 1 + rnd(h),
            f"{p}.self_attn.q_proj.weight": rnd(q, h),
            f"{p}.self_attn.k_proj.weight": rnd(kv, h),
            f"{p}.self_attn.v_proj.weight": rnd(kv, h),
            f"{p}.self_attn.o_proj.weight": rnd(h, q),
            f"{p}.mlp.gate_proj.weight": rnd(cfg.intermediate_size, h),
            f"{p}.mlp.up_proj.weight": rnd(cfg.intermediate_size, h),
            f"{p}.mlp.down_proj.weight": rnd(h, cfg.intermediate_size),
        }
    return out


def tiny_model(
    cfg: ModelConfig = TINY, methods: LinearMethodTable | None = None, seed: int = 0
) -> Transformer:
    model = Transformer(cfg, methods, torch.float32)
    with torch.no_grad():
        model.load_weights(tiny_tensors(cfg, seed).items())
    return model.eval()
