"""Weight-only int8/int4 projections (tdllm.model.int8_methods, tdllm.model.int4_methods): the
kernels compute the product with the dequantized weight, the quantization error stays within
half a step, and the model around them (fused shards, tied head, batched prefill, sealed reader)
is unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tdllm.model import quantized
from tdllm.model.cpu_features import HAS_VNNI
from tdllm.model.int4_methods import Int4WeightOnlyMethod, int4_quantize
from tdllm.model.int8_methods import (
    Int8DynamicMethod,
    Int8WeightOnlyMethod,
    int8_quantize,
    int8_weights,
)
from tdllm.model.linear import Linear, LinearMethodTable, PlainCpuMethod
from tdllm.model.quantized import quant_method
from tdllm.model.staged_quant import KERNEL_DTYPE
from tdllm.model.transformer import Batch, KVCache
from tests.tiny_model import TINY, tiny_model, tiny_tensors

METHODS = {"int8": Int8WeightOnlyMethod, "int4": Int4WeightOnlyMethod}


def dequantized(method: str, weight: torch.Tensor) -> torch.Tensor:
    """The weight the kernel multiplies by, in fp32 (scales rounded as the method stores them)."""
    if method == "int8":
        q, s = int8_quantize(weight)
        return q.float() * s.to(KERNEL_DTYPE).float()[:, None]
    q, s, z = int4_quantize(weight)
    g = weight.shape[1] // s.shape[1]
    s16, z16 = s.to(KERNEL_DTYPE).float(), z.to(KERNEL_DTYPE).float()
    grouped = (q.float() - 8).reshape(q.shape[0], -1, g) * s16[..., None] + z16[..., None]
    return grouped.reshape(weight.shape)


def layer_with(method: str, shards: list[int], in_features: int, dtype: torch.dtype) -> Linear:
    return Linear("t", in_features, sum(shards), METHODS[method](), dtype, shards)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("shards", "in_features", "lead"),
    [
        ([96], 64, (5,)),
        ([64, 32, 32], 128, (2, 7)),
        ([160, 160], 96, (3, 1)),
        ([48], 256, (1, 1)),
        ([64, 32, 32], 64, (2, 70)),  # a long prefill: int8 widens blocks for oneDNN
        ([2100], 32, (130,)),  # ... of more rows than one widened block
    ],
)
def test_method_equals_the_dequantized_weight_product(
    method: str, dtype: torch.dtype, shards: list[int], in_features: int, lead: tuple[int, ...]
) -> None:
    g = torch.Generator().manual_seed(sum(shards) + in_features)
    weight = torch.randn(sum(shards), in_features, generator=g) * 0.1
    layer = layer_with(method, shards, in_features, dtype)
    offset = 0
    for rows in reversed(shards):  # shards may arrive in any order, at their own offsets
        start = sum(shards) - offset - rows
        layer.method.load_weight(layer, weight[start : start + rows], start)
        offset += rows
    layer.method.after_load(layer)
    x = torch.randn(*lead, in_features, generator=g).to(dtype)
    y = layer(x)
    assert y.shape == (*lead, sum(shards)) and y.dtype == dtype
    # the kernel's inputs and output are bf16 (KERNEL_DTYPE), its sums fp32: the result is
    # the fp32 product with the dequantized weight, rounded to bf16 (a few ulps of slack)
    reference = x.to(KERNEL_DTYPE).float() @ dequantized(method, weight).T
    assert torch.allclose(y.float(), reference, atol=1e-2, rtol=2**-6)


def test_int8_error_of_each_row_is_at_most_half_its_step() -> None:
    weight = torch.randn(300, 64) * torch.logspace(-3, 1, 300)[:, None]  # rows of every scale
    q, scales = int8_quantize(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    error = (q.float() * scales[:, None] - weight).abs().amax(dim=1)
    assert torch.all(error <= scales / 2 * (1 + 1e-5))
    assert torch.allclose(scales, weight.abs().amax(dim=1) / 127)


def test_int4_error_of_each_group_is_at_most_half_its_step() -> None:
    weight = torch.randn(40, 128) * torch.logspace(-2, 1, 40)[:, None]
    q, scales, zeros = int4_quantize(weight, 32)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    back = ((q.float() - 8).reshape(40, 4, 32) * scales[..., None] + zeros[..., None]).reshape(
        weight.shape
    )
    error = (back - weight).abs().reshape(40, 4, 32).amax(-1)
    assert torch.all(error <= scales / 2 * (1 + 1e-4) + 1e-6)


def test_all_zero_rows_quantize_to_zero_without_dividing_by_zero() -> None:
    weight = torch.zeros(4, 64)
    q, s = int8_quantize(weight)
    assert not torch.isnan(s).any() and int(q.abs().sum()) == 0
    _, s4, _ = int4_quantize(weight, 32)
    assert not torch.isnan(s4).any()
    assert torch.all(dequantized("int4", weight) == 0)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_model_keeps_only_quantized_weights_and_drops_the_float_rows(quant: str) -> None:
    tied = dataclasses.replace(TINY, tie_word_embeddings=True)
    model = tiny_model(tied, LinearMethodTable(default=quant_method(quant)))
    model.after_load()
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * TINY.num_layers + 1  # qkv, o, gate|up, down per block; the head
    for layer in linears:
        assert not [n for n, b in layer.named_buffers() if n.startswith("staged")]
        assert not any(p.is_floating_point() for p in layer.parameters())
        assert layer.qweight.dtype == (torch.int8 if quant == "int8" else torch.uint8)
    # the embedding stays float; the tied head holds its own quantized copy of it
    assert model.embed_tokens.weight.dtype == torch.float32
    assert model.lm_head.qweight.data_ptr() != model.embed_tokens.weight.data_ptr()


def test_loading_twice_into_a_quantized_projection_is_refused() -> None:
    layer = layer_with("int8", [32], 32, torch.float32)
    layer.method.load_weight(layer, torch.randn(32, 32))
    with pytest.raises(ValueError, match="after the projection was quantized"):
        layer.method.load_weight(layer, torch.randn(32, 32))


@pytest.mark.parametrize("method", [Int4WeightOnlyMethod, Int8DynamicMethod])
def test_staged_memory_is_not_zero_filled_yet_what_is_packed_does_not_depend_on_it(
    monkeypatch: pytest.MonkeyPatch, method: type
) -> None:
    """Staging allocates without zero-filling (every real row is written once; zero-filling
    cost 8 s of an 8B load): the padding rows (int4: 70 rows padded to 80) and W8A8's range
    columns must still come out zero, whatever the allocator hands back."""
    if method is Int8DynamicMethod and not HAS_VNNI:
        pytest.skip("W8A8 needs a CPU with VNNI")
    weight = torch.randn(70, 64, generator=torch.Generator().manual_seed(5))

    def loaded() -> Linear:
        layer = Linear("t", 64, 70, method(), torch.float32)
        layer.method.load_weight(layer, weight)
        layer.method.after_load(layer)
        return layer

    clean = loaded()
    real_empty = torch.empty
    with monkeypatch.context() as patch:  # memory full of stale bytes
        patch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(7))
        dirty = loaded()
    x = torch.randn(3, 64)
    assert torch.equal(dirty(x), clean(x))
    if method is Int4WeightOnlyMethod:
        assert torch.equal(dirty.qweight, clean.qweight)
        assert torch.equal(dirty.scales_zeros, clean.scales_zeros)
    else:
        assert all(map(torch.equal, int8_weights(dirty), int8_weights(clean)))


def test_a_projection_missing_rows_fails_after_load() -> None:
    layer = layer_with("int8", [16, 16], 32, torch.float32)
    layer.method.load_weight(layer, torch.randn(16, 32))
    with pytest.raises(ValueError, match="16 of 32 rows"):
        layer.method.after_load(layer)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_model_is_close_to_the_float_one_and_prefills_prompts_together(
    quant: str,
) -> None:
    plain = tiny_model()
    model = tiny_model(methods=LinearMethodTable(default=quant_method(quant)))
    assert model.prefills_together()
    tokens = torch.tensor([[5, 9, 13, 2, 44, 7]])
    logits = []
    for m in (plain, model):
        cache = KVCache(m.cfg, 2, 16, torch.float32)
        logits.append(m(tokens, Batch([0], [0], 6), cache, last_only=False))
    # logits up to ~4; measured: a plain bf16 model 0.07 off, int8 (bf16 kernel inputs) 0.09,
    # int4 1.2 (random Gaussian weights are int4's worst case; the bundled model: integration)
    assert torch.allclose(logits[0], logits[1], atol=2.0 if quant == "int4" else 0.15)
    # a padded prefill of two prompts: each row as it would be alone
    cache = KVCache(model.cfg, 2, 16, torch.float32)
    short = [5, 9, 13, 0, 0, 0]
    together = model(
        torch.tensor([tokens[0].tolist(), short]),
        Batch([0, 1], [0, 0], 6, lengths=[6, 3]),
        cache,
    )
    alone = model(
        torch.tensor([short[:3]]), Batch([1], [0], 3), KVCache(model.cfg, 2, 16, torch.float32)
    )
    assert torch.allclose(together[1], alone[0], atol=1e-5)


def test_the_reader_is_never_given_a_quantized_buffer_to_decrypt_into() -> None:
    model = tiny_model(methods=LinearMethodTable(default=Int8WeightOnlyMethod()))
    targets = model.weight_destinations()
    assert "model.embed_tokens.weight" in targets and "model.norm.weight" in targets
    assert not any(name.endswith("proj.weight") or name == "lm_head.weight" for name in targets)
    assert all(t.is_floating_point() for t in targets.values())
    plain = tiny_model().weight_destinations()
    assert {n for n in plain if n.endswith("proj.weight")} == {
        n for n in tiny_tensors() if n.endswith("proj.weight")
    }


def test_plain_method_stays_the_default_without_quant() -> None:
    assert quant_method("none") is None
    assert isinstance(LinearMethodTable(default=quant_method("none")).default, PlainCpuMethod)
    with pytest.raises(ValueError, match="unknown quant"):
        quant_method("int3")


def test_widened_products_first_run_under_inference_mode_also_run_outside_it() -> None:
    # the per-thread scratch blocks are kept across calls: one made (or grown) under inference
    # mode must still be writable by a later call under no_grad (a layer used by a check)
    from tdllm.model.int4_methods import int4_pack
    from tdllm.model.int4_widen import int4_widened_linear
    from tdllm.model.linear import widened_linear

    torch.manual_seed(0)
    weight = torch.randn(4096, 1024)  # larger than any scratch another test grew
    q, _ = int8_quantize(weight)
    packed, sz = int4_pack(weight)
    x = torch.randn(3, 1024).bfloat16()
    results = []
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            int8 = widened_linear(x, q, torch.bfloat16, torch.bfloat16, 4096)
            int4 = int4_widened_linear(x, packed, sz.bfloat16(), 32, 4096)
            results.append((int8.clone(), int4.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize(
    ("vnni", "head"), [(True, Int8DynamicMethod), (False, Int8WeightOnlyMethod)]
)
def test_int4s_head_is_w8a8_only_where_the_cpu_has_vnni(
    monkeypatch: pytest.MonkeyPatch, vnni: bool, head: type
) -> None:
    # without VNNI W8A8 is refused at load: a W8A8 head made int4 unloadable on an AVX2 EPYC
    monkeypatch.setattr(quantized, "HAS_VNNI", vnni)
    table = quantized.quant_table("int4")
    assert type(table.method_for("lm_head")) is head
    assert type(table.method_for("model.layers.0.mlp.down_proj")) is Int4WeightOnlyMethod
