"""The `obfuscated` profile (seed 000): every projection offloaded with decoys, restored in the TD.

`obfuscate_model` takes a loaded TD `Transformer` and, per block, puts on the device:

- ``L.qkv``: q and k padded per head with decoy RoPE pairs (η of the head dimension), scaled
  per pair and shuffled within each KV group, then v ShadowNet-obfuscated; ``L.inv_freq``: the
  RoPE frequency of every padded pair (the device must rotate them). The attention core
  (`ObfuscatedAttention`) gets the padded scores and v back, subtracts the decoy scores and runs
  softmax and softmax·V in the TD.
- ``L.o``, ``L.gate_up``, ``L.down`` and ``lm_head``: ShadowNet-obfuscated (rows scaled, padded
  with η decoy rows, permuted); the TD restores the real rows.

The embedding, the norms, the decoy weights and every secret stay in the TD; the plaintext
projection weights are dropped from TD memory once obfuscated. What this does not hide is in
docs/security.md (§ obfuscated): the attack suite (A2, A4, A6) recovers the weights.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field

import torch

from tdllm.model.linear import Linear
from tdllm.model.transformer import Attention, FeedForward, Transformer
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.obfuscation import (
    DEFAULT_ETA,
    ComputedByCore,
    Deviation,
    ObfuscatedAttention,
    ObfuscatedLinear,
    QKSecret,
    ShadowSecret,
    generator,
    pad_qk,
    shadow_obfuscate,
)

ATTRIBUTE = "obfuscation"  # where the model keeps its `Obfuscation`


@dataclass
class Obfuscation:
    """The secrets of one obfuscated model (TD only), by the device's resident names."""

    crossing: Crossing
    eta: float
    shadow: dict[str, ShadowSecret] = field(default_factory=dict)  # resident -> secret
    qk: dict[str, QKSecret] = field(default_factory=dict)  # "model.layers.N" -> secret
    cores: list[ObfuscatedAttention] = field(default_factory=list)

    def record_deviation(self) -> list[Deviation]:
        """Start recording the seed's deviation figures, one `Deviation` per layer."""
        for core in self.cores:
            core.deviation = Deviation()
        return [core.deviation for core in self.cores if core.deviation is not None]


def obfuscate_model(
    model: Transformer,
    crossing: Crossing,
    max_batch: int,
    max_seq_len: int,
    eta: float = DEFAULT_ETA,
    seed: int | None = None,
) -> Obfuscation:
    """Put every projection of `model` on the device obfuscated; returns the TD's secrets."""
    cfg = model.cfg
    if cfg.head_dim % 2 or cfg.num_heads % cfg.num_kv_heads:
        raise ValueError("obfuscated needs an even head_dim and whole GQA groups")
    if not 0 < eta <= 1:
        raise ValueError("eta must be in (0, 1]")
    gen = generator(seed)
    dtype = model.dtype
    ob = Obfuscation(crossing, eta)
    inv_freq = 1.0 / (
        cfg.rope_theta
        ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim)
    )
    with torch.no_grad():
        for i, block in enumerate(model.layers):
            prefix = f"model.layers.{i}"
            attn = block.self_attn
            if not isinstance(attn, Attention):
                raise TypeError(f"{prefix}: not a Llama attention block")
            wq, wk, wv = _weight(attn.qkv_proj).split(attn.sizes)
            q_dev, k_dev, qk = pad_qk(
                wq, wk, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, inv_freq, eta, gen
            )
            v_dev, v_secret = shadow_obfuscate(wv, eta, gen)
            crossing.put(f"{prefix}.qkv", torch.cat((q_dev, k_dev, v_dev)).to(dtype))
            crossing.put(f"{prefix}.inv_freq", qk.device_freq.float())
            core = ObfuscatedAttention(
                crossing, prefix, qk, v_secret, v_dev.shape[0], max_batch, max_seq_len
            )
            ob.qk[prefix], ob.shadow[f"{prefix}.v"] = qk, v_secret
            ob.cores.append(core)
            attn.core = core
            _retire(attn.qkv_proj)
            attn.qkv_proj.method = ComputedByCore()
            mlp = block.mlp
            if not isinstance(mlp, FeedForward):
                raise TypeError(f"{prefix}: not a SwiGLU block")
            for linear, short in (
                (attn.o_proj, "o"),
                (mlp.gate_up_proj, "gate_up"),
                (mlp.down_proj, "down"),
            ):
                _offload(ob, linear, f"{prefix}.{short}", eta, gen, dtype)
        _offload(ob, model.lm_head, "lm_head", eta, gen, dtype)
    setattr(model, ATTRIBUTE, ob)
    return ob


def obfuscation_of(model: Transformer) -> Obfuscation | None:
    ob = getattr(model, ATTRIBUTE, None)
    return ob if isinstance(ob, Obfuscation) else None


def _offload(
    ob: Obfuscation,
    linear: Linear,
    resident: str,
    eta: float,
    gen: torch.Generator,
    dtype: torch.dtype,
) -> None:
    padded, secret = shadow_obfuscate(_weight(linear), eta, gen)
    ob.crossing.put(resident, padded.to(dtype))
    ob.shadow[resident] = secret
    _retire(linear)
    linear.method = ObfuscatedLinear(ob.crossing, resident, padded.shape[0], secret)


def _weight(linear: Linear) -> torch.Tensor:
    weight = linear.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{linear.name} holds no plain weight to obfuscate")
    return weight.detach()


def _retire(linear: Linear) -> None:
    """Drop the plaintext weight from TD memory (a tied lm_head's is the embedding's, kept)."""
    delattr(linear, "weight")


def synthetic_deviation(
    hidden: int = 4096,
    heads: int = 32,
    head_dim: int = 128,
    tokens: int = 128,
    eta: float = DEFAULT_ETA,
    std: float = 0.02,
    seed: int = 0,
) -> tuple[float, float]:
    """The seed's setting (N=4096, 32 heads of 128, W' normal like W): deviation figures.

    ``x`` and ``Wq``/``Wk`` are Gaussian (weights with std `std`); no RoPE (the seed's code has
    none); scores scaled by 1/√head_dim and causally masked. Returns ‖qk-qk_‖/‖qk‖, ‖s-s_‖/‖s‖.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    wq = torch.randn(heads * head_dim, hidden, generator=gen, dtype=torch.float64) * std
    wk = torch.randn(heads * head_dim, hidden, generator=gen, dtype=torch.float64) * std
    zero_freq = torch.zeros(head_dim // 2)
    q_dev, k_dev, secret = pad_qk(wq, wk, heads, heads, head_dim, zero_freq, eta, gen)
    q_dev, k_dev = q_dev.double(), k_dev.double()
    dim = secret.dim

    def scores(q: torch.Tensor, k: torch.Tensor, d: int) -> torch.Tensor:
        q = q.view(tokens, heads, d).transpose(0, 1)
        k = k.view(tokens, heads, d).transpose(0, 1)
        return q @ k.transpose(-1, -2) / math.sqrt(head_dim)

    true = scores(x @ wq.T, x @ wk.T, head_dim)
    padded = scores(x @ q_dev.T, x @ k_dev.T, dim)
    visible = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    s = torch.softmax(true.masked_fill(~visible, float("-inf")), -1)
    s_ = torch.softmax(padded.masked_fill(~visible, float("-inf")), -1)
    score_dev = float((true - padded)[:, visible].norm() / true[:, visible].norm())
    return score_dev, float((s - s_).norm() / s.norm())


def bundled_deviation(prompts: list[str] | None = None) -> dict[str, object]:
    """The seed's figures on the bundled model, recorded in a real obfuscated generation."""
    from tdllm.engine import Engine, SamplingParams
    from tdllm.model.loader import load_model
    from tdllm.model.sources import open_checkpoint

    checkpoint = open_checkpoint("bundled")
    model, _ = load_model(checkpoint, torch.float32)
    crossing = Crossing.open("cpu")
    try:
        ob = obfuscate_model(model, crossing, 1, 256, seed=0)
        records = ob.record_deviation()
        engine = Engine(model, checkpoint.tokenizer, max_batch=1, max_seq_len=256)
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        for text in prompts or DEVIATION_PROMPTS:
            engine.generate([checkpoint.tokenizer.encode(text)], params)
    finally:
        crossing.close()
    per_layer = [r.ratios() for r in records]
    total = Deviation(
        sum(r.score_diff for r in records),
        sum(r.score_norm for r in records),
        sum(r.prob_diff for r in records),
        sum(r.prob_norm for r in records),
    )
    scores, probs = total.ratios()
    return {
        "model": checkpoint.name,
        "score_deviation": scores,
        "softmax_deviation": probs,
        "per_layer_score": [round(a, 4) for a, _ in per_layer],
        "per_layer_softmax": [round(b, 4) for _, b in per_layer],
    }


DEVIATION_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in one sentence.",
]


if __name__ == "__main__":  # python -m tdllm.protection.obfuscated: the seed's figures
    score, prob = synthetic_deviation()
    report: dict[str, object] = {
        "synthetic_seed_setting": {"score_deviation": score, "softmax_deviation": prob}
    }
    report["bundled"] = bundled_deviation()
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")
