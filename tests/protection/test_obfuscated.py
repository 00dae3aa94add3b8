"""`obfuscated` (seed 000): the same outputs as td-only, decoys removed, the seed's figures."""

from __future__ import annotations

import math

import pytest
import torch

from tdllm.model.checkpoint import Checkpoint
from tdllm.model.loader import load_model
from tdllm.model.rotary import apply_rope, rope_tables
from tdllm.model.transformer import Batch, KVCache, Transformer
from tdllm.profiles import ProtectionOptions, build_model
from tdllm.profiles.obfuscated import Obfuscated
from tdllm.trusted.publishable import plaintext_activation
from tdllm.untrusted.transcript import tensor_bytes
from tdllm_lab.protection.obfuscated import synthetic_deviation
from tests.protection.conftest import CFG, MAX_BATCH, MAX_SEQ, checkpoint_of
from tests.protection.engine_runs import PROMPTS, greedy_tokens

TOKENS = torch.tensor([[5, 17, 3, 42, 8, 9, 1, 60, 2]])


@pytest.fixture
def private_ckpt(private_tensors: dict[str, torch.Tensor]) -> Checkpoint:
    return checkpoint_of("tiny-private", private_tensors)


def logits(model: Transformer) -> torch.Tensor:
    cache = KVCache(CFG, MAX_BATCH, MAX_SEQ, torch.float32)
    with torch.no_grad():
        return model(TOKENS, Batch([0], [0], TOKENS.shape[1]), cache, last_only=False)


@pytest.mark.parametrize("device", ["cpu", "process"])
def test_obfuscated_model_computes_the_td_only_logits_and_tokens(
    device: str, private_ckpt: Checkpoint
) -> None:
    plain = load_model(private_ckpt, torch.float32)[0]
    options = ProtectionOptions("obfuscated", device, obfuscation_seed=7)
    served = build_model(private_ckpt, torch.float32, options, MAX_BATCH, MAX_SEQ)
    model = served.model
    try:
        assert served.crossing is not None and served.crossing.kind == device
        want, got = logits(plain), logits(model)
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), (got - want).abs().max()
        # prefill and batched decode of sequences of different lengths (per-row positions)
        assert greedy_tokens(model) == greedy_tokens(plain)
    finally:
        served.close()


def test_obfuscated_model_in_bf16_stays_within_bf16_rounding(private_ckpt: Checkpoint) -> None:
    plain = load_model(private_ckpt, torch.bfloat16)[0]
    options = ProtectionOptions("obfuscated", "cpu", obfuscation_seed=7)
    served = build_model(private_ckpt, torch.bfloat16, options, MAX_BATCH, MAX_SEQ)
    model = served.model
    try:
        cache = KVCache(CFG, MAX_BATCH, MAX_SEQ, torch.bfloat16)
        with torch.no_grad():
            got = model(TOKENS, Batch([0], [0], TOKENS.shape[1]), cache, last_only=False)
        want = load_model(private_ckpt, torch.float32)[0]
        ref = logits(want)
        plain_err = (logits_bf16(plain) - ref).abs().max()
        assert (got.float() - ref).abs().max() <= 4 * plain_err + 1e-2
    finally:
        served.close()


def logits_bf16(model: Transformer) -> torch.Tensor:
    cache = KVCache(CFG, MAX_BATCH, MAX_SEQ, torch.bfloat16)
    with torch.no_grad():
        return model(TOKENS, Batch([0], [0], TOKENS.shape[1]), cache, last_only=False).float()


def test_device_scores_minus_the_td_decoy_scores_are_the_real_scores(
    private_ckpt: Checkpoint,
) -> None:
    plain = load_model(private_ckpt, torch.float32)[0]
    attn = plain.layers[CFG.num_layers - 1].self_attn
    wq, wk, _ = attn.qkv_proj.weight.detach().split(attn.sizes)  # type: ignore[union-attr]
    options = ProtectionOptions("obfuscated", "cpu", obfuscation_seed=3)
    served = build_model(private_ckpt, torch.float32, options, MAX_BATCH, MAX_SEQ)
    crossing, profile = served.crossing, served.profile
    try:
        assert crossing is not None and isinstance(profile, Obfuscated)
        assert profile.obfuscation is not None
        ob = profile.obfuscation
        layer = f"model.layers.{CFG.num_layers - 1}"
        secret = ob.qk[layer]
        x = torch.randn(1, 6, CFG.hidden_size, generator=torch.Generator().manual_seed(0))
        out = crossing.call(
            "obfuscated_ops.attention_scores",
            {"x": plaintext_activation(x)},
            {"scores": ((1, CFG.num_heads, 6, 6), torch.float32), "v": ((1, 6, 17), x.dtype)},
            {
                "layer": layer,
                "heads": CFG.num_heads,
                "kv_heads": CFG.num_kv_heads,
                "dim": secret.dim,
                "slots": [0],
                "starts": [0],
                "max_batch": MAX_BATCH,
                "max_seq": MAX_SEQ,
            },
        )
    finally:
        served.close()
    cos, sin = rope_tables(CFG.head_dim, CFG.rope_theta, MAX_SEQ)
    cos, sin = cos[:6], sin[:6]
    group = CFG.num_heads // CFG.num_kv_heads
    q = apply_rope((x @ wq.T).view(1, 6, CFG.num_heads, -1).transpose(1, 2), cos, sin)
    k = apply_rope((x @ wk.T).view(1, 6, CFG.num_kv_heads, -1).transpose(1, 2), cos, sin)
    real = q @ k.repeat_interleave(group, 1).transpose(-1, -2)
    # the decoy pairs' own scores, from the TD's copy of the decoy weights and frequencies
    angles = torch.arange(6).float()[:, None] * secret.decoy_freq.float()[:, None, :]
    dcos, dsin = torch.cat((angles.cos(),) * 2, -1), torch.cat((angles.sin(),) * 2, -1)
    qd = (x @ secret.pad_q.float().reshape(-1, CFG.hidden_size).T).view(1, 6, CFG.num_heads, -1)
    kd = (x @ secret.pad_k.float().reshape(-1, CFG.hidden_size).T).view(1, 6, CFG.num_kv_heads, -1)
    qd = apply_rope(
        qd.transpose(1, 2), dcos.repeat_interleave(group, 0), dsin.repeat_interleave(group, 0)
    )
    kd = apply_rope(kd.transpose(1, 2), dcos, dsin)
    decoy = qd @ kd.repeat_interleave(group, 1).transpose(-1, -2)
    padded = out["scores"]
    assert torch.allclose(padded - decoy, real, atol=1e-4, rtol=1e-4)
    assert float((padded - real).norm() / real.norm()) > 0.05  # the decoys do change the scores


def test_device_holds_only_padded_weights_never_a_real_row(
    private_tensors: dict[str, torch.Tensor], private_ckpt: Checkpoint
) -> None:
    options = ProtectionOptions("obfuscated", "process", keep_payloads=True, obfuscation_seed=1)
    served = build_model(private_ckpt, torch.float32, options, MAX_BATCH, MAX_SEQ)
    model = served.model
    try:
        greedy_tokens(model, PROMPTS[:2], n=3)
        crossing = served.crossing
        assert crossing is not None
        held = crossing.dump()
        haystack = b"".join(r.payload or b"" for r in crossing.transcript.records)
    finally:
        served.close()
    last = f"model.layers.{CFG.num_layers - 1}"
    per_head = CFG.head_dim + 2  # one decoy RoPE pair per tiny head (η·8 rounds to 1 pair)
    assert held[f"{last}.qkv"].shape[0] == (CFG.num_heads + CFG.num_kv_heads) * per_head + 17
    assert held[f"{last}.inv_freq"].shape == (CFG.num_kv_heads, per_head // 2)
    assert held["lm_head"].shape == (
        CFG.vocab_size + math.ceil(CFG.vocab_size / 16),
        CFG.hidden_size,
    )
    assert {f"{last}.o", f"{last}.gate_up", f"{last}.down", f"{last}.kcache"} <= set(held)
    # no real weight row crosses as it is: every row is scaled (and the rows are permuted)
    for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
        row = private_tensors[f"{last}.{name}.weight"][3]
        assert tensor_bytes(row[:4]) not in haystack
    # the TD dropped its plaintext projection weights
    assert not hasattr(model.layers[0].mlp.down_proj, "weight")
    assert isinstance(served.profile, Obfuscated) and served.profile.obfuscation is not None


def test_seed_deviation_figures_when_decoys_are_not_removed() -> None:
    # seed 000 reports 20-25% (scores) and 20-30% (softmax) for η = 1/16, head_dim 128
    scores, probs = synthetic_deviation(heads=4, tokens=64)  # N = 4096, 4 of the 32 heads
    assert 0.20 <= scores <= 0.30
    assert 0.20 <= probs <= 0.30


@pytest.mark.slow
def test_seed_deviation_figures_in_the_seed_setting() -> None:
    scores, probs = synthetic_deviation()  # N = 4096, 32 heads of 128
    assert 0.20 <= scores <= 0.25 + 0.02
    assert 0.20 <= probs <= 0.30


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", "process"])
def test_bundled_model_obfuscated_generates_the_td_only_tokens(
    device: str, bundled_checkpoint: Checkpoint
) -> None:
    tokenizer = bundled_checkpoint.tokenizer
    prompts = [tokenizer.encode(p) for p in ("The capital of France is", "def fibonacci(n):")]
    prompts += [tokenizer.encode(p) for p in ("Water boils at", "Once upon a time")]
    plain = load_model(bundled_checkpoint, torch.float32)[0]
    options = ProtectionOptions("obfuscated", device)
    served = build_model(bundled_checkpoint, torch.float32, options, 4, 48)
    model = served.model
    try:
        assert greedy_tokens(model, prompts, n=16) == greedy_tokens(plain, prompts, n=16)
    finally:
        served.close()


@pytest.mark.slow
def test_bundled_deviation_figures_are_recorded_in_a_real_run() -> None:
    from tdllm_lab.protection.obfuscated import bundled_deviation

    report = bundled_deviation(["The capital of France is"])
    assert len(report["per_layer_score"]) == 30  # type: ignore[arg-type]
    assert 0.0 < float(report["score_deviation"]) < 1.0  # type: ignore[arg-type]
    assert 0.0 < float(report["softmax_deviation"]) < 1.5  # type: ignore[arg-type]
