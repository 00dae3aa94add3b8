"""int8 weight-only (tdllm.model.int8_methods) on the real bundled model, against bf16 plain."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.model.int8_methods import Int8WeightOnlyMethod
from tdllm.model.linear import LinearMethodTable
from tdllm.model.loader import load_model
from tdllm.model.transformer import Batch, KVCache, Transformer

PROMPTS = (
    "The capital of France is",
    "Here is a short recipe for tomato soup:",
    "def fibonacci(n):",
)
NEW_TOKENS = 32


def greedy_and_logits(model: Transformer, checkpoint: Any) -> tuple[list[list[int]], torch.Tensor]:
    ids = [checkpoint.tokenizer.encode(p) for p in PROMPTS]
    engine = Engine(model, checkpoint.tokenizer, max_batch=1, max_seq_len=96)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    tokens = [engine.generate([p], params)[0].token_ids for p in ids]
    cache = KVCache(model.cfg, 1, 64, model.dtype)
    with torch.no_grad():
        logits = model(torch.tensor([ids[0]]), Batch([0], [0], len(ids[0])), cache)
    return tokens, logits[0, -1].float()


@pytest.fixture(scope="module")
def bf16_and_int8(bundled_checkpoint: Any) -> dict[str, Any]:
    out = {}
    for name, methods in (
        ("bf16", None),
        ("int8", LinearMethodTable(default=Int8WeightOnlyMethod())),
    ):
        model, _ = load_model(bundled_checkpoint, torch.bfloat16, methods)
        out[name] = greedy_and_logits(model, bundled_checkpoint)
        del model
    return out


def test_int8_greedy_tokens_mostly_agree_with_bf16(bf16_and_int8: dict[str, Any]) -> None:
    (plain, _), (quant, _) = bf16_and_int8["bf16"], bf16_and_int8["int8"]
    assert all(len(t) == NEW_TOKENS for t in plain + quant)
    same = sum(a == b for p, q in zip(plain, quant, strict=True) for a, b in zip(p, q, strict=True))
    first_difference = [
        next((i for i, (a, b) in enumerate(zip(p, q, strict=True)) if a != b), NEW_TOKENS)
        for p, q in zip(plain, quant, strict=True)
    ]
    # measured (2 threads, AVX-512 bf16 EPYC): 64/96 positions equal, the continuations first
    # differ at tokens 17, 9 and 25 (a near-tie flips, then the texts drift apart); asserted a
    # little below, so a kernel or rounding change that breaks the quantization fails here
    assert same >= 56, (same, first_difference)
    assert min(first_difference) >= 6, first_difference


def test_int8_next_token_logits_stay_close_to_bf16(bf16_and_int8: dict[str, Any]) -> None:
    (_, plain), (_, quant) = bf16_and_int8["bf16"], bf16_and_int8["int8"]
    # measured: max |difference| 1.45 on logits up to ~20 in magnitude; the same top token
    assert float((plain - quant).abs().max()) < 2.5
    assert int(plain.argmax()) == int(quant.argmax())
