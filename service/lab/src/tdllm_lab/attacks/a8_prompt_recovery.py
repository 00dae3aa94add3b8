"""A8: recover prompt tokens from what the device sees at layer 0.

The adversary holds the public base (G2), so for every vocabulary token ``v`` it can compute the
layer-0 activation the device would see for ``v`` in plaintext. Per prompt it takes the device's
layer-0 view and runs two attacks:

- nearest neighbour: each observed row is matched to the closest candidate (scikit-learn, exact
  Euclidean; for ring words, the circular distance in Z_2^32); the guess at each position is
  scored against the true token: the token recovery rate;
- row-space membership (protection.md L6): candidates whose residual after projection onto the
  span of the observed rows (scipy.linalg.orth) is ~0 are declared present; scored as the
  bag-of-words F1 against the prompt's tokens.

Device views: `split` — the layer-0 value cache the device holds (``kv.0.v``: position-
independent, no RoPE), candidates ``v_proj(norm_0(embed(v)))``; `masked` — the int32 words sent
for layer 0's qkv product, candidates the fixed-point ``norm_0(embed(v))`` the device would get
unpadded; `obfuscated` — the plaintext input of layer 0's padded qkv product (the seed's scheme
obfuscates weights, not activations), candidates ``norm_0(embed(v))``. ``value`` is the better
of the two rates; prompt privacy holds at <= 5%.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg  # type: ignore[import-untyped]
import torch
from sklearn.neighbors import NearestNeighbors  # type: ignore[import-untyped]

from tdllm.model.transformer import Batch, KVCache
from tdllm.trusted.masked_ring import RING, quantize_activation, x_max_for
from tdllm_lab.attacks.a1_private_bytes import Target, default_checkpoints, open_target
from tdllm_lab.attacks.device_view import parse_calls
from tdllm_lab.attacks.result import AttackOptions, AttackResult

THRESHOLD = 0.05
LAYER0_QKV = "model.layers.0.self_attn.qkv_proj"  # masked: the call's "weight"
LAYER0 = "model.layers.0"  # obfuscated: the attention_scores call's "layer"
MEMBER_RESIDUAL = 1e-4  # relative residual under which a candidate is "in the span"
HELD_OUT = (
    "The committee postponed its decision on the new bridge until the spring.",
    "Bake the bread for forty minutes, then let it cool on a wire rack.",
    "My grandmother kept every letter she received during the war.",
    "Quarterly revenue rose nine percent, driven by strong overseas demand.",
    "The patient reported mild headaches and trouble sleeping after the surgery.",
    "Please send the signed contract back to our Berlin office by Friday.",
    "A sudden storm forced the sailing team to return to the harbour early.",
    "The library will close at noon on Saturday for electrical repairs.",
)


def _normed_embeddings(base: dict[str, torch.Tensor], eps: float) -> torch.Tensor:
    """``norm_0(embed(v))`` for every token, as the TD model computes it (fp32)."""
    x = base["model.embed_tokens.weight"].float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return base["model.layers.0.input_layernorm.weight"].float() * x


def candidates(target: Target) -> np.ndarray:
    cfg = target.model.cfg
    normed = _normed_embeddings(target.base, cfg.rms_norm_eps)
    if target.profile == "split":
        return (normed @ target.base["model.layers.0.self_attn.v_proj.weight"].float().T).numpy()
    if target.profile == "obfuscated":
        return normed.numpy()
    words, _ = quantize_activation(normed, x_max_for(cfg.hidden_size))
    return words.numpy()


def observe(target: Target, prompt: list[int]) -> np.ndarray:
    """The device's layer-0 rows ``[len(prompt), width]`` after prefilling `prompt`."""
    mark = len(target.crossing.transcript.records)
    cache = KVCache(target.model.cfg, 1, target.max_seq, torch.float32)
    with torch.no_grad():
        target.model(torch.tensor([prompt]), Batch([0], [0], len(prompt)), cache)
    if target.profile == "split":
        v = target.crossing.dump()["kv.0.v"][0, :, : len(prompt)]  # [kv_heads, T, head_dim]
        return v.transpose(0, 1).reshape(len(prompt), -1).float().numpy()
    key, wanted = ("layer", LAYER0) if target.profile == "obfuscated" else ("weight", LAYER0_QKV)
    for call in parse_calls(target.crossing.transcript.records[mark:]):
        if call.params.get(key) == wanted:
            x = call.args["x"]
            rows = x.reshape(-1, x.shape[-1])
            return (rows.float() if rows.is_floating_point() else rows).numpy()
    raise RuntimeError("the device never received layer 0's qkv input")


def nearest_tokens(observed: np.ndarray, cands: np.ndarray, ring: bool) -> np.ndarray:
    if not ring:
        index = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(cands)
        return index.kneighbors(observed, return_distance=False)[:, 0]
    obs = torch.from_numpy(observed.astype(np.int64))
    cand = torch.from_numpy(cands.astype(np.int64))
    best = torch.full((obs.shape[0],), -1, dtype=torch.int64)
    best_d = torch.full((obs.shape[0],), float("inf"), dtype=torch.float64)
    for start in range(0, cand.shape[0], 256):
        diff = torch.remainder(obs[:, None, :] - cand[None, start : start + 256], RING)
        dist = torch.minimum(diff, RING - diff).to(torch.float64).sum(-1)
        d, j = dist.min(dim=1)
        better = d < best_d
        best = torch.where(better, j + start, best)
        best_d = torch.where(better, d, best_d)
    return best.numpy()


def members(observed: np.ndarray, cands: np.ndarray) -> set[int]:
    basis = scipy.linalg.orth(observed.astype(np.float64).T)  # [width, rank]
    c = cands.astype(np.float64)
    residual = c - (c @ basis) @ basis.T
    norms = np.linalg.norm(c, axis=1)
    rel = np.linalg.norm(residual, axis=1) / np.maximum(norms, 1e-30)
    return {int(i) for i in np.flatnonzero(rel < MEMBER_RESIDUAL)}


def measure(target: Target, prompts: list[list[int]]) -> dict[str, Any]:
    cands = candidates(target)
    ring = target.profile == "masked"
    hits = total = 0
    f1s: list[float] = []
    for prompt in prompts:
        observed = observe(target, prompt)
        guess = nearest_tokens(observed, cands, ring)
        hits += int((guess == np.array(prompt)).sum())
        total += len(prompt)
        found, truth = members(observed, cands), set(prompt)
        true_pos = len(found & truth)
        precision = true_pos / len(found) if found else 0.0
        recall = true_pos / len(truth)
        f1s.append(2 * precision * recall / (precision + recall) if true_pos else 0.0)
    return {
        "prompts": len(prompts),
        "prompt_tokens": total,
        "vocabulary": int(cands.shape[0]),
        "chance_rate": 1 / cands.shape[0],
        "nearest_neighbour_recovery": hits / total,
        "membership_bag_of_words_f1": float(np.mean(f1s)),
    }


def run(options: AttackOptions) -> AttackResult:
    private, base = default_checkpoints(options.k)
    prompts = [private.tokenizer.encode(text) for text in HELD_OUT]
    prompts = prompts[:2] if options.quick else prompts
    target = open_target(options.profile, options.device, private, base, options.k, 64)
    try:
        detail = measure(target, prompts)
    finally:
        target.close()
    if options.profile == "split":
        detail["claim"] = "split does not hide prompts: its prefix sees them by design"
    if options.profile == "obfuscated":
        detail["claim"] = "obfuscated hides weights only: its projections get plaintext inputs"
    value = max(detail["nearest_neighbour_recovery"], detail["membership_bag_of_words_f1"])
    return AttackResult(
        "A8",
        options.profile,
        "fraction of prompt tokens recovered from layer-0 device data",
        value,
        value <= THRESHOLD,
        detail,
    )
