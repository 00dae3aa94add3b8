"""A block's decode step in one call (`tdllm.model.one_call_block`) against the eager block it
stands in for, and the steps it must leave to the eager block."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.model import avx2_kernel
from tdllm.model.int4_methods import Int4W4A8Method
from tdllm.model.linear import Linear, LinearMethodTable
from tdllm.model.quantized import quant_table
from tdllm.model.transformer import Batch, Block, KVCache, Transformer
from tests.cpu_kernels import needs_avx2
from tests.protection.engine_runs import NoTokenizer
from tests.tiny_model import TINY, tiny_model

pytestmark = needs_avx2

# head_dim 32 (a multiple of 8, as the op needs); every projection's inputs a multiple of 32
CFG = dataclasses.replace(
    TINY, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=32
)
# three sequences of different lengths in slots out of order: the cache write and each row's
# own keys (the eager block masks the longer rows' keys instead)
SLOTS, LENGTHS = [2, 0, 3], [5, 11, 1]


def model_on(form: str, methods: LinearMethodTable | None = None) -> Transformer:
    """The model with each projection in `form`: w4a8 (int4 with offsets, floats quantized at
    load), w4a8-symmetric (Q4_0's grid: the layout without offsets) or w8a8-avx2 (int8)."""
    if methods is None:  # int4 on the AVX2 kernel on any CPU (w4a8 takes AVX-512's where it can)
        w4a8 = LinearMethodTable(default=Int4W4A8Method(avx2_kernel))
        methods = w4a8 if form.startswith("w4a8") else quant_table(form)
    model = tiny_model(CFG, methods)
    if form == "w4a8-symmetric":
        for layer in model.modules():
            if isinstance(layer, Linear) and isinstance(layer.method, Int4W4A8Method):
                n, k = layer.out_features, layer.in_features
                codes, scales, _ = avx2_kernel.unpack4(layer.qweight, n, k)
                layer.qweight = avx2_kernel.pack4(codes[:n], scales[:n], -8 * scales[:n])
                assert layer.qweight.shape[2] == 1152  # the symmetric form
    model.after_load()
    return model


def with_context(model: Transformer) -> KVCache:
    """A cache holding each of the three sequences' prompt."""
    cache = KVCache(CFG, 4, 32, torch.float32)
    g = torch.Generator().manual_seed(1)
    for slot, n in zip(SLOTS, LENGTHS, strict=True):
        tokens = torch.randint(0, CFG.vocab_size, (1, n), generator=g)
        model(tokens, Batch([slot], [0], n), cache)
    return cache


def eager(block: Block) -> Block:
    block.one_call = None
    return block


@pytest.mark.parametrize("form", ["w4a8", "w4a8-symmetric", "w8a8-avx2"])
def test_a_decode_step_in_one_call_is_the_eager_blocks_within_rounding(form: str) -> None:
    fast, slow = model_on(form), model_on(form)
    cache = with_context(fast)
    batch = Batch(SLOTS, LENGTHS, 1)
    cos = fast.rope_cos[batch.positions][:, :, None]
    signed = fast.rope_signed_sin[batch.positions][:, :, None]
    x = torch.randn(3, 1, CFG.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        for i, (one, other) in enumerate(zip(fast.layers, slow.layers, strict=True)):
            assert isinstance(one, Block) and isinstance(other, Block) and one.one_call
            assert one.one_call.takes(x)
            k, v = cache.k[i].clone(), cache.v[i].clone()
            got = one(x, batch, cos, signed, cache.k[i], cache.v[i])
            want = eager(other)(x, batch, cos, signed, k, v)
            scale = float(want.abs().max())
            # summation orders differ (the norm's mean, softmax); an input group's int8 rounding
            # may flip on a last bit: one code step of one product, far below 1e-3
            assert torch.allclose(got, want, rtol=0, atol=1e-3 * scale), (i, got - want)
            for mine, theirs in ((cache.k[i], k), (cache.v[i], v)):
                assert torch.allclose(mine, theirs, rtol=0, atol=1e-4 * float(theirs.abs().max()))
                # the step's key and value went into each row's slot at its position, only there
                written = (mine != 0).any(-1).sum(-1)  # [slots, kv_heads] positions written
                assert written[:, 0].tolist() == [11 + 1, 0, 5 + 1, 1 + 1]
            x = got


def test_the_engines_logits_step_by_step_stay_the_eager_blocks() -> None:
    fast, slow = model_on("w4a8"), model_on("w4a8")
    for block in slow.layers:
        assert isinstance(block, Block)
        eager(block)
    caches = [KVCache(CFG, 2, 32, torch.float32) for _ in range(2)]
    tokens = [7, 3, 55, 21, 9, 80, 14, 2, 33, 61]
    with torch.inference_mode():
        for model, cache in zip((fast, slow), caches, strict=True):
            model(torch.tensor([tokens[:2]]), Batch([1], [0], 2), cache)
        for position, token in enumerate(tokens[2:], start=2):
            step = [
                m(torch.tensor([[token]]), Batch([1], [position], 1), c)
                for m, c in zip((fast, slow), caches, strict=True)
            ]
            scale = float(step[1].abs().max())
            assert torch.allclose(step[0], step[1], rtol=0, atol=1e-3 * scale), position
            assert int(step[0].argmax()) == int(step[1].argmax())


@pytest.mark.parametrize("quant", [None, "int4", "int8"])
def test_blocks_not_on_our_avx2_kernels_stay_eager(quant: str | None) -> None:
    model = tiny_model(CFG, quant_table(quant) if quant else None)
    model.after_load()
    assert all(isinstance(b, Block) and b.one_call is None for b in model.layers)


def test_a_subclass_of_the_int4_method_stays_eager() -> None:
    # a profile's method built on ours (masked's, a device's) has crossings the op would skip
    class Elsewhere(Int4W4A8Method):
        pass

    table = LinearMethodTable(default=Elsewhere(avx2_kernel))
    model = model_on("w4a8", table)
    assert all(isinstance(b, Block) and b.one_call is None for b in model.layers)


def test_a_hook_a_profiles_core_autograd_or_a_prompt_take_the_eager_block() -> None:
    model = model_on("w4a8")
    block = model.layers[0]
    assert isinstance(block, Block) and block.one_call is not None
    one = torch.zeros(1, 1, CFG.hidden_size)
    with torch.inference_mode():
        assert block.one_call.takes(one)
        assert not block.one_call.takes(torch.zeros(1, 2, CFG.hidden_size))  # a prompt
        assert not block.one_call.takes(one.bfloat16())
    with torch.enable_grad():
        assert not block.one_call.takes(one)
    cache = with_context(model)
    seen: list[torch.Tensor] = []
    handle = block.mlp.down_proj.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.inference_mode():
        assert not block.one_call.takes(one)
        model(torch.tensor([[4], [8], [15]]), Batch(SLOTS, LENGTHS, 1), cache)
    handle.remove()
    assert len(seen) == 1  # the hooked projection ran, in the eager block
    cores: list[torch.Tensor] = []

    def core(x: torch.Tensor, *_rest: object) -> torch.Tensor:  # a profile's attention
        cores.append(x)
        return torch.zeros(x.shape[0], 1, CFG.num_heads * CFG.head_dim)

    block.self_attn.core = core
    assert not model.decodes_in_one_call()
    with torch.inference_mode():
        model(torch.tensor([[4], [8], [15]]), Batch(SLOTS, [n + 1 for n in LENGTHS], 1), cache)
    assert len(cores) == 1


def test_a_compile_setting_gives_way_where_every_block_decodes_in_one_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = model_on("w4a8")
    assert model.decodes_in_one_call()
    with caplog.at_level(logging.WARNING, logger="tdllm.engine.engine"):
        engine = Engine(model, NoTokenizer(), 4, 48, compile="decode-groups")  # type: ignore[arg-type]
    assert model.decode_step is None and engine.compile_seconds == 0
    assert "compile 'decode-groups' not applied" in caplog.text
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    eager_model = model_on("w4a8")
    for block in eager_model.layers:
        assert isinstance(block, Block)
        eager(block)
    eager_engine = Engine(eager_model, NoTokenizer(), 4, 48)  # type: ignore[arg-type]
    prompts = [[1, 2, 3], [9, 8]]
    got = [c.token_ids for c in engine.generate(prompts, [params, params])]
    assert got == [c.token_ids for c in eager_engine.generate(prompts, [params, params])]


def test_a_position_outside_the_cache_is_an_index_error_before_anything_is_written() -> None:
    model = model_on("w4a8")
    cache = with_context(model)
    before = cache.k[0].clone()
    batch = Batch([0], [32], 1)  # the cache holds positions 0..31
    cos = model.rope_cos[batch.positions][:, :, None]
    signed = model.rope_signed_sin[batch.positions][:, :, None]
    block = model.layers[0]
    assert isinstance(block, Block) and block.one_call is not None
    with torch.inference_mode(), pytest.raises(IndexError, match="outside the cache"):
        block.one_call(
            torch.zeros(1, 1, CFG.hidden_size), batch, cos, signed, cache.k[0], cache.v[0]
        )
    assert torch.equal(cache.k[0], before)


@pytest.mark.parametrize("wrong", ["projection", "kv_heads"])
def test_a_projection_or_head_count_that_does_not_fit_is_refused_before_anything_is_written(
    wrong: str,
) -> None:
    model = model_on("w4a8")
    cache = with_context(model)
    before = cache.k[0].clone()
    block = model.layers[0]
    assert isinstance(block, Block) and block.one_call is not None
    one = block.one_call
    batch = Batch([0], [11], 1)
    cos = model.rope_cos[batch.positions][:, :, None]
    signed = model.rope_signed_sin[batch.positions][:, :, None]
    qkv, o, gate_up, down = (p.qweight for p in one.projections)
    if wrong == "projection":  # o's weights where q|k|v's belong
        qkv, kv_heads, match = o, one.kv_heads, "qkv: not a packed AVX2 projection"
    else:
        kv_heads, match = 0, "caches"
    with torch.inference_mode(), pytest.raises(RuntimeError, match=match):
        torch.ops.tdllm_avx2.decode_block(
            torch.zeros(1, 1, CFG.hidden_size), batch.slot_index, batch.positions, cos, signed,
            one.norms[0].weight, one.norms[1].weight, 1e-5, qkv, o, gate_up, down,
            one.heads, kv_heads, one.intermediate, cache.k[0], cache.v[0],
        )  # fmt: skip
    assert torch.equal(cache.k[0], before)
