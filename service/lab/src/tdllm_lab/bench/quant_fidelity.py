"""`tdllm bench fidelity --quant int8 [--quant int4]`: what weight-only quantization
(`tdllm.model.quantized`) costs in quality, against the fp32 model.

The same held-out text and prompts as the masked profile's fidelity (`masked_fidelity`): the
perplexity of one causal forward over `HELD_OUT_TEXT`, and the greedy tokens of each model over
the 8 prompts compared position by position with fp32's (and how many continuations are
identical). bf16 unquantized is the floor: the agreement a rounding change everyone accepts
already leaves. Each quant runs with fp32 and with bf16 activations.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from tdllm.model.checkpoint import Checkpoint
from tdllm.model.loader import load_model
from tdllm.model.quantized import quant_table
from tdllm_lab.protection.masked_fidelity import (
    HELD_OUT_TEXT,
    PROMPTS,
    agreement_vs_fp32,
    greedy,
    perplexity,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure_quant(checkpoint: Checkpoint, quants: Sequence[str], new_tokens: int) -> dict[str, Any]:
    tokenizer = checkpoint.tokenizer
    text_ids = tokenizer.encode(HELD_OUT_TEXT)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    configs = [(d, "none") for d in DTYPES] + [(d, q) for q in quants for d in DTYPES]
    ppl: dict[str, float] = {}
    tokens: dict[str, list[list[int]]] = {}
    for dtype_name, quant in configs:
        name = dtype_name if quant == "none" else f"{quant} {dtype_name}"
        dtype = DTYPES[dtype_name]
        start = time.perf_counter()
        model, _ = load_model(checkpoint, dtype, quant_table(quant))
        ppl[name] = perplexity(model, text_ids, dtype)
        tokens[name] = [greedy(model, p, new_tokens, dtype) for p in prompts]
        del model
        seconds = round(time.perf_counter() - start, 1)
        print(f"{name}: perplexity {ppl[name]:.4f} ({seconds} s)", file=sys.stderr)
    greedy_report = agreement_vs_fp32(tokens, new_tokens)
    return {
        "model": checkpoint.name,
        "threads": torch.get_num_threads(),
        "held_out_tokens": len(text_ids),
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "perplexity": ppl,
        "greedy": greedy_report,
    }
