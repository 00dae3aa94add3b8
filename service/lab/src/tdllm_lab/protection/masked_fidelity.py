"""What the `masked` profile's quantization costs in quality, and what it costs the TD in FLOPs.

``tdllm bench fidelity [--model bundled] [--json]`` compares, on the same
MODEL: the unquantized fp32 and bf16 TD models against the masked profile's quantized path
(int8 public-base weights, fixed-point activations, the TD's exact delta). The quantized path
is computed by the TD reference (`build_masked(..., crossing=None)`), which the tests prove
bit-identical in greedy tokens to the masked device path, so no device is needed here.

- perplexity on held-out text (`HELD_OUT_TEXT`, written for this project, so not in any
  training set), one causal forward over all of it;
- greedy-token agreement of bf16 and of the quantized path with the fp32 model over 8 prompts
  x `new_tokens`: the fraction of generated positions equal, and how many of the 8
  continuations are identical. bf16 is the baseline: how often does a rounding change that
  everyone accepts already flip a near-tie? (Its decode is slow on CPUs without native bf16.)
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from tdllm.model.checkpoint import Checkpoint
from tdllm.model.config import ModelConfig
from tdllm.model.loader import load_model
from tdllm.model.transformer import Batch, KVCache, Transformer
from tdllm.profiles.masked import build_masked

HELD_OUT_TEXT = (
    "The old lighthouse on the northern cape was switched off in 1987, when satellite "
    "navigation made it redundant. For years the building stood empty, its windows broken by "
    "winter storms and its iron stairs slowly rusting. Then a group of volunteers from the "
    "nearby village formed a trust, raised money with bake sales and concerts, and persuaded the "
    "regional council to lease them the site for a symbolic rent of one euro a year. The "
    "restoration took six summers. Carpenters rebuilt the wooden floors, a retired engineer "
    "repaired the clockwork that once turned the lens, and schoolchildren painted the outer "
    "walls in the original red and white bands. Today the lighthouse is a small museum. "
    "Visitors climb the one hundred and twelve steps to the lantern room, where a guide explains "
    "how keepers trimmed the wicks every four hours through the night. On clear evenings the "
    "trust lights the lamp again for an hour, not to warn ships, but to remind the village of "
    "the people who once kept it burning. Meanwhile, in the city, the council debated a plan to "
    "replace the central bus station with a park. Supporters argued that the buses could stop "
    "along the ring road instead, freeing three hectares for trees, a playground and a market "
    "hall. Opponents worried that elderly passengers would have to walk further, and that the "
    "market would compete with the shops on the high street. After four hours of discussion the "
    "vote was postponed until an independent study of passenger flows is finished next year."
)
GREEDY = ("fp32", "bf16", "masked-int8")
PROMPTS = (
    "The best way to learn a new language is",
    "Here is a short recipe for tomato soup:",
    "The main causes of the French Revolution were",
    "Photosynthesis is the process by which",
    "Write a polite email declining a meeting invitation.",
    "Three tips for staying focused while working from home:",
    "The difference between a virus and a bacterium is",
    "In the year 2050, cities will",
)


def perplexity(model: Transformer, ids: list[int], dtype: torch.dtype) -> float:
    cache = KVCache(model.cfg, 1, len(ids), dtype)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        logits = model(tokens, Batch([0], [0], len(ids)), cache, last_only=False)
    loss = F.cross_entropy(logits[0, :-1].float(), tokens[0, 1:])
    return math.exp(float(loss))


def greedy(model: Transformer, ids: list[int], new: int, dtype: torch.dtype) -> list[int]:
    cache = KVCache(model.cfg, 1, len(ids) + new, dtype)
    out: list[int] = []
    with torch.no_grad():
        logits = model(torch.tensor([ids]), Batch([0], [0], len(ids)), cache)
        for step in range(new):
            out.append(int(logits[0, -1].argmax()))
            if step + 1 < new:
                logits = model(torch.tensor([[out[-1]]]), Batch([0], [len(ids) + step], 1), cache)
    return out


def agreement_vs_fp32(tokens: dict[str, list[list[int]]], new_tokens: int) -> dict[str, Any]:
    """Per variant: the share of greedy tokens equal to fp32's, and whole continuations equal."""
    reference = tokens["fp32"]
    agreement = {}
    for name, runs in tokens.items():
        same = sum(
            a == b for r, f in zip(runs, reference, strict=True) for a, b in zip(r, f, strict=True)
        )
        agreement[name] = {
            "token_agreement_vs_fp32": same / (len(runs) * new_tokens),
            "identical_continuations": sum(r == f for r, f in zip(runs, reference, strict=True)),
        }
    return agreement


def td_flop_share(cfg: ModelConfig, context: int) -> dict[str, float]:
    """Per decoded token at `context`: the share of multiply-accumulates the TD does itself.

    td-only: all of them. masked (exact pads): the TD computes each pad's product with the public
    weight (as many MACs as the device's GEMM), the lm_head, attention over `context`, and the
    Freivalds checks (4 (in + out) per row); the device does the block GEMMs. A dense tail delta
    (K fine-tuned blocks) adds its own GEMMs; it is counted by `delta_macs` separately.
    """
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = [(h, q + 2 * kv), (q, h), (h, 2 * inter), (inter, h)]
    gemm = layers * sum(i * o for i, o in shapes)
    checks = layers * sum(4 * (i + o) for i, o in shapes)
    attention = layers * 2 * q * context
    head = h * cfg.vocab_size
    total_plain = gemm + attention + head
    td_masked = gemm + checks + attention + head  # pads' products = the device's GEMMs
    return {
        "device_gemm_macs": float(gemm),
        "td_only_td_share": 1.0,
        "masked_td_share": td_masked / (td_masked + gemm),
        "masked_td_macs_vs_td_only": td_masked / total_plain,
        "delta_macs_per_tail_block": float(sum(i * o for i, o in shapes)),
    }


def measure(
    checkpoint: Checkpoint, base: Checkpoint, new_tokens: int, quants: tuple[str, ...] = ()
) -> dict[str, Any]:
    """`quants`: also masked with each (its TD-held delta and head quantized), rows
    ``masked-int8+QUANT``; with MODEL = BASE there is no delta and only the head differs."""
    tokenizer = checkpoint.tokenizer
    text_ids = tokenizer.encode(HELD_OUT_TEXT)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    models: dict[str, tuple[Transformer, torch.dtype]] = {
        "fp32": (load_model(checkpoint, torch.float32)[0], torch.float32),
        "bf16": (load_model(checkpoint, torch.bfloat16)[0], torch.bfloat16),
        "masked-int8": (build_masked(checkpoint, base, torch.float32, None)[0], torch.float32),
    }
    greedy_rows = set(GREEDY)
    for quant in quants:
        masked = build_masked(checkpoint, base, torch.float32, None, quant=quant)[0]
        models[f"masked-int8+{quant}"] = (masked, torch.float32)
        greedy_rows.add(f"masked-int8+{quant}")
    ppl: dict[str, float] = {}
    tokens: dict[str, list[list[int]]] = {}
    seconds: dict[str, float] = {}
    for name, (model, dtype) in models.items():
        start = time.perf_counter()
        ppl[name] = perplexity(model, text_ids, dtype)
        if name in greedy_rows:
            tokens[name] = [greedy(model, p, new_tokens, dtype) for p in prompts]
        seconds[name] = round(time.perf_counter() - start, 1)
        print(f"{name}: perplexity {ppl[name]:.4f} ({seconds[name]} s)", file=sys.stderr)
    agreement = agreement_vs_fp32(tokens, new_tokens)
    return {
        "model": checkpoint.name,
        "base": base.name,
        "held_out_tokens": len(text_ids),
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "perplexity": ppl,
        "perplexity_increase_vs_fp32": ppl["masked-int8"] / ppl["fp32"] - 1,
        "perplexity_increase_vs_bf16": ppl["masked-int8"] / ppl["bf16"] - 1,
        "greedy": agreement,
        "seconds": seconds,
        "td_flops": td_flop_share(checkpoint.config, len(prompts[0]) + new_tokens),
        "threads": torch.get_num_threads(),
    }
