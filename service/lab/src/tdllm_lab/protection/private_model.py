"""`is_private` (which tensors the split keeps in the TD) and a stand-in private model.

The real private model is `tdllm finetune-tail`'s (`finetune.py`; cached by `private_cache.py`
for the benchmark, `tdllm protect --report` and the appliance). `privatize` is a stand-in for
the fast tests on tiny random models, where a fine-tune would teach nothing: the base with its
last K blocks and final norm perturbed (noise of 5% of each tensor's own standard deviation,
seeded) and its lm_head untied. Its private bytes really differ from the base and sit exactly
where the split keeps them, which is all the boundary tests need; it is not a useful model.
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


def stand_in_checkpoint(base: Checkpoint, k: int, seed: int = 0) -> Checkpoint:
    """`privatize` of a whole checkpoint (lm_head untied), e.g. of the bundled base where no
    fine-tune can be trained or carried (a lent GPU machine); same shapes and arithmetic."""
    cfg = dataclasses.replace(base.config, tie_word_embeddings=False)
    tensors = privatize(base.tensors(), cfg, k, seed)
    return Checkpoint(
        f"{base.name}-standin-k{k}", base.path, cfg, base.tokenizer, lambda: iter(tensors.items())
    )
