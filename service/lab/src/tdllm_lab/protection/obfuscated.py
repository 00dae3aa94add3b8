"""The seed's deviation figures for the `obfuscated` profile (profiles/obfuscated.py): how far
the padded scores the device computes are from the real ones, on the seed's synthetic setting
and on the bundled model in a real generation (`python -m tdllm_lab.protection.obfuscated`).
"""

from __future__ import annotations

import json
import math
import sys

import torch

from tdllm.trusted.obfuscation import DEFAULT_ETA, Deviation, pad_qk


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
    from tdllm.profiles.obfuscated import Obfuscated
    from tdllm.profiles.options import ProtectionOptions
    from tdllm.profiles.registry import build_model
    from tdllm.sources import open_checkpoint

    checkpoint = open_checkpoint("bundled")
    options = ProtectionOptions("obfuscated", "cpu", obfuscation_seed=0)
    served = build_model(checkpoint, torch.float32, options, 1, 256)
    try:
        profile = served.profile
        if not isinstance(profile, Obfuscated) or profile.obfuscation is None:
            raise RuntimeError("the obfuscated build kept no secrets")
        records = profile.obfuscation.record_deviation()
        engine = Engine(served.model, checkpoint.tokenizer, max_batch=1, max_seq_len=256)
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        for text in prompts or DEVIATION_PROMPTS:
            engine.generate([checkpoint.tokenizer.encode(text)], params)
    finally:
        served.close()
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


if __name__ == "__main__":  # python -m tdllm_lab.protection.obfuscated: the seed's figures
    score, prob = synthetic_deviation()
    report: dict[str, object] = {
        "synthetic_seed_setting": {"score_deviation": score, "softmax_deviation": prob}
    }
    report["bundled"] = bundled_deviation()
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")
