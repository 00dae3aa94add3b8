"""A stand-in private model: the base with its last K blocks perturbed and its lm_head untied.

Until `tdllm finetune-tail` exists this is how tests and the benchmark get a model whose private
part really differs from the public base, confined exactly where the split keeps it. Deterministic
for a seed: noise of 5% of each tensor's own standard deviation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from tdllm.model.checkpoint import Checkpoint
from tdllm.model.config import ModelConfig

RELATIVE_NOISE = 0.05


def is_private(name: str, cfg: ModelConfig, k: int) -> bool:
    """True for the tensors the split keeps in the TD: tail blocks, final norm, lm_head."""
    if name in ("model.norm.weight", "lm_head.weight"):
        return True
    parts = name.split(".")
    return name.startswith("model.layers.") and int(parts[2]) >= cfg.num_layers - k


def privatize(
    tensors: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig, k: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        out[name] = tensor.float().clone()
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    for name in sorted(out):
        if is_private(name, cfg, k):
            t = out[name]
            noise = torch.randn(t.shape, generator=g) * (RELATIVE_NOISE * float(t.std()) + 1e-3)
            out[name] = t + noise
    return out


def private_checkpoint(base: Checkpoint, k: int, seed: int = 0) -> Checkpoint:
    """`base` privatized in memory (fp32 tensors), with an untied head."""
    cfg = dataclasses.replace(base.config, tie_word_embeddings=False)
    tensors = privatize(base.tensors(), cfg, k, seed)
    return Checkpoint(
        f"{base.name}-private-k{k}", base.path, cfg, base.tokenizer, lambda: iter(tensors.items())
    )
