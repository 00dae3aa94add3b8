"""`masked`: greedy tokens bit-identical to the TD's plain path with the same quantization."""

from __future__ import annotations

import pytest
import torch

from tdllm.model.checkpoint import Checkpoint
from tdllm.profiles.masked import build_masked
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.masked_ring import exact_product, quantize_weight, wide_chunks, wrap32
from tests.protection.engine_runs import greedy_tokens


@pytest.mark.parametrize("device", ["cpu", "process"])
def test_masked_greedy_tokens_equal_the_quantized_td_reference(
    device: str,
    private_checkpoint: Checkpoint,
    base_checkpoint: Checkpoint,
    crossings: list[Crossing],
) -> None:
    reference, _ = build_masked(private_checkpoint, base_checkpoint, torch.float32, None)
    crossing = Crossing.open(device)
    crossings.append(crossing)
    masked, method = build_masked(private_checkpoint, base_checkpoint, torch.float32, crossing)
    report = method.report
    expected = greedy_tokens(reference, n=6)
    assert greedy_tokens(masked, n=6) == expected
    assert method.stats.calls > 0
    assert method.stats.checked_calls == method.stats.calls  # every product was checked
    # the tail (K=2 blocks) differs from BASE and is kept exactly in the TD
    assert len(report.residuals) == 2 * 4 and report.worst() == 0.0


def test_masked_logits_match_the_reference_bit_for_bit_in_bf16(
    private_checkpoint: Checkpoint, base_checkpoint: Checkpoint, crossings: list[Crossing]
) -> None:
    from tdllm.model.transformer import Batch, KVCache

    crossing = Crossing.open("cpu")
    crossings.append(crossing)
    models = [
        build_masked(private_checkpoint, base_checkpoint, torch.bfloat16, c)[0]
        for c in (None, crossing)
    ]
    tokens = torch.tensor([[5, 17, 3, 42, 8, 9]])
    logits = []
    for model in models:
        cache = KVCache(model.cfg, 1, 16, torch.bfloat16)
        with torch.no_grad():
            logits.append(model(tokens, Batch([0], [0], 6), cache, last_only=False))
    assert torch.equal(logits[0], logits[1])


def test_quantized_reference_is_close_to_the_unquantized_model(
    private_checkpoint: Checkpoint, base_checkpoint: Checkpoint
) -> None:
    from tdllm.model.loader import load_model
    from tdllm.model.transformer import Batch, KVCache

    plain, _ = load_model(private_checkpoint, torch.float32)
    reference, _ = build_masked(private_checkpoint, base_checkpoint, torch.float32, None)
    tokens = torch.tensor([[5, 17, 3, 42, 8, 9, 60, 2]])
    out = []
    for model in (plain, reference):
        cache = KVCache(model.cfg, 1, 16, torch.float32)
        with torch.no_grad():
            out.append(model(tokens, Batch([0], [0], 8), cache, last_only=False))
    error = float((out[0] - out[1]).norm() / out[0].norm())
    assert 0 < error < 0.05  # int8 weights, ~15-bit activations: small but not zero


def test_ring_product_is_exact_where_float32_is_not() -> None:
    g = torch.Generator().manual_seed(0)
    q, _ = quantize_weight(torch.randn(7, 1536, generator=g))
    x = torch.randint(-(2**31), 2**31, (3, 1536), generator=g, dtype=torch.int64).to(torch.int32)
    exact = (x.to(torch.int64)[:, None, :] * q.to(torch.int64)[None]).sum(-1)  # Python-int-safe
    assert torch.equal(exact_product(x, wide_chunks(q)), exact)
    assert torch.equal(wrap32(exact), wrap32((x.double() @ q.double().T).to(torch.int64)))
    assert not torch.equal((x.float() @ q.float().T).to(torch.int64), exact)
