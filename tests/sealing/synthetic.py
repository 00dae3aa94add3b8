"""Tiny synthetic models for the sealing tests.

The synthetic model has a 64-token character vocabulary and random weights, so sealing, opening
and loading it takes milliseconds; only the round-trip test against the bundled model pays for
the real weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer as BpeBackend
from tokenizers import decoders, models

from tdllm.model.checkpoint import Checkpoint
from tdllm.model.config import ModelConfig
from tdllm.model.tokenizer import Tokenizer
from tests.tiny_model import TINY as TINY_MODEL

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?0123456789"[:62]
TINY = dataclasses.replace(TINY_MODEL, vocab_size=64)  # one token per ALPHABET char + 2
SMALL_CHUNK = 256  # bytes: many chunks per tensor, so chunk-level mutations have targets


def tiny_tokenizer() -> Tokenizer:
    """A character-level tokenizer: ids 0/1 are <s>/</s>, then one token per character."""
    vocab = {"<s>": 0, "</s>": 1} | {c: i + 2 for i, c in enumerate(ALPHABET)}
    backend = BpeBackend(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, bos_token_id=0, eos_token_id=1, chat_template=None)


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face names and shapes of every tensor a Llama checkpoint for `cfg` holds."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}"
        shapes |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (cfg.num_heads * d, h),
            f"{p}.self_attn.k_proj.weight": (cfg.num_kv_heads * d, h),
            f"{p}.self_attn.v_proj.weight": (cfg.num_kv_heads * d, h),
            f"{p}.self_attn.o_proj.weight": (h, cfg.num_heads * d),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.mlp.gate_proj.weight": (i, h),
            f"{p}.mlp.up_proj.weight": (i, h),
            f"{p}.mlp.down_proj.weight": (h, i),
        }
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def synthetic_checkpoint(
    seed: int = 0,
    cfg: ModelConfig = TINY,
    dtype: torch.dtype = torch.float32,
    tokenizer: Tokenizer | None = None,
    name: str = "tiny",
) -> Checkpoint:
    """A checkpoint of random weights (fixed by `seed`), streamed like a real one."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        n: (torch.randn(s, generator=generator) * 0.1).to(dtype)
        for n, s in tensor_shapes(cfg).items()
    }

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        yield from ((n, t.clone()) for n, t in tensors.items())

    return Checkpoint(name, Path(name), cfg, tokenizer or tiny_tokenizer(), stream)


def tensors_of(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    return dict(checkpoint.tensors())


Sealer = Callable[..., Path]
