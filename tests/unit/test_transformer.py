"""The model file: strategy-driven projections, weight loading checks, KV cache and batching."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from tdllm.model.linear import Linear, LinearMethodTable, PlainCpuMethod
from tdllm.model.rotary import apply_rope, rope_tables, rotate, signed_sin
from tdllm.model.transformer import Batch, DecodeWindow, KVCache, Transformer
from tests.tiny_model import TINY, tiny_model, tiny_tensors


class CountingMethod(PlainCpuMethod):
    """A plain method that records which layers it ran, to prove the table routes by name."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(layer.name)
        return super().apply(layer, x)


def full_forward(model: Transformer, ids: list[int]) -> torch.Tensor:
    cache = KVCache(model.cfg, 1, len(ids), torch.float32)
    with torch.inference_mode():
        return model(torch.tensor([ids]), Batch([0], [0], len(ids)), cache, last_only=False)[0]


def test_model_never_constructs_nn_linear() -> None:
    model = tiny_model()
    assert not [m for m in model.modules() if isinstance(m, nn.Linear)]
    names = sorted(m.name for m in model.modules() if isinstance(m, Linear))
    assert "lm_head" in names
    assert "model.layers.1.self_attn.qkv_proj" in names
    assert "model.layers.0.mlp.down_proj" in names


def test_method_table_routes_layers_by_name_pattern() -> None:
    counting = CountingMethod()
    table = LinearMethodTable([("model.layers.1.*", counting)])
    model = tiny_model(methods=table)
    full_forward(model, [1, 2, 3])
    assert counting.calls  # the matching layers ran through the chosen method ...
    assert all(name.startswith("model.layers.1.") for name in counting.calls)
    assert set(counting.calls) == {
        "model.layers.1.self_attn.qkv_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.gate_up_proj",
        "model.layers.1.mlp.down_proj",
    }  # ... and no other layer did


def test_incremental_decode_matches_full_recompute() -> None:
    model = tiny_model()
    ids = [5, 17, 3, 42, 8, 9, 61]
    reference = full_forward(model, ids)
    cache = KVCache(model.cfg, 2, 16, torch.float32)
    with torch.inference_mode():
        model(torch.tensor([ids[:3]]), Batch([1], [0], 3), cache)
        for pos in range(3, len(ids)):
            step = model(torch.tensor([[ids[pos]]]), Batch([1], [pos], 1), cache)[0, -1]
            torch.testing.assert_close(step, reference[pos], rtol=1e-5, atol=1e-5)


def test_batched_decode_of_different_lengths_matches_each_alone() -> None:
    model = tiny_model()
    seqs = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12]]
    cache = KVCache(model.cfg, 4, 16, torch.float32)
    slots = [3, 0, 2]  # deliberately not contiguous
    with torch.inference_mode():
        for slot, s in zip(slots, seqs, strict=True):
            model(torch.tensor([s[:-1]]), Batch([slot], [0], len(s) - 1), cache)
        last = torch.tensor([[s[-1]] for s in seqs])
        batched = model(last, Batch(slots, [len(s) - 1 for s in seqs], 1), cache)[:, -1]
    for row, s in enumerate(seqs):
        torch.testing.assert_close(batched[row], full_forward(model, s)[-1], rtol=1e-5, atol=1e-5)


def test_tied_lm_head_shares_the_embedding() -> None:
    cfg = dataclasses.replace(TINY, tie_word_embeddings=True)
    model = tiny_model(cfg)
    assert model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"), "lacks"),
        (lambda t: t.__setitem__("model.layers.9.mlp.up_proj.weight", torch.zeros(1)), "no such"),
        (
            lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 3)),
            "shape",
        ),
        (lambda t: t.__setitem__("model.norm.weight", torch.zeros(7)), "shape"),
    ],
    ids=["missing tensor", "unknown tensor", "wrong projection shape", "wrong norm shape"],
)
def test_rejects_checkpoint_that_does_not_fit(mutate, message) -> None:  # type: ignore[no-untyped-def]
    tensors = tiny_tensors()
    mutate(tensors)
    model = Transformer(TINY)
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model.load_weights(tensors.items())


def test_rejects_checkpoint_tensor_given_twice() -> None:
    tensors = list(tiny_tensors().items())
    model = Transformer(TINY)
    with pytest.raises(ValueError, match="twice"), torch.no_grad():
        model.load_weights([*tensors, tensors[0]])


@pytest.mark.parametrize("rows", [1, 7, 8, 130])
def test_widened_bf16_path_equals_fp32_product_rounded_once(rows: int) -> None:
    torch.manual_seed(0)
    layer = Linear("l", 64, 5000, PlainCpuMethod(native_bf16=False), torch.bfloat16)
    layer.load_weight(torch.randn(5000, 64))
    x = torch.randn(2, rows, 64).bfloat16()
    with torch.inference_mode():
        out = layer(x)
    expected = torch.nn.functional.linear(x.float(), layer.weight.float()).bfloat16()
    assert out.dtype == torch.bfloat16
    if rows * 2 >= 16:  # the widened path: bit-identical to one rounding of the fp32 product
        assert torch.equal(out, expected)
    else:  # PyTorch's own bf16 GEMM: same values up to bf16 rounding
        torch.testing.assert_close(out, expected, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("slots", [[1, 2, 3], [3, 0, 2]], ids=["contiguous", "scattered"])
def test_prompts_prefilled_together_match_each_prefilled_alone(slots: list[int]) -> None:
    """A padded multi-prompt prefill: each row's last-token logits, and the cache it leaves for
    the decode that follows, are those of the prompt run alone (the padding is never seen)."""
    model = tiny_model()
    prompts = [[5, 17, 3, 42, 8, 9], [7, 8], [9, 10, 11, 12]]
    width = max(len(p) for p in prompts)
    tokens = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    cache = KVCache(model.cfg, 4, 16, torch.float32)
    lengths = [len(p) for p in prompts]
    with torch.inference_mode():
        first = model(tokens, Batch(slots, [0, 0, 0], width, lengths), cache)[:, -1]
        nxt = torch.tensor([[p[-1] + 1] for p in prompts])
        second = model(nxt, Batch(slots, lengths, 1), cache)[:, -1]
    for row, p in enumerate(prompts):
        alone = full_forward(model, [*p, p[-1] + 1])
        torch.testing.assert_close(first[row], alone[len(p) - 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(second[row], alone[len(p)], rtol=1e-5, atol=1e-5)


def test_decode_attention_equals_sdpa_over_repeated_key_heads() -> None:
    from torch.nn import functional as F

    from tdllm.model.cache_layout import decode_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 1, 8, generator=g)
    keys, values = torch.randn(3, 2, 11, 8, generator=g), torch.randn(3, 2, 11, 8, generator=g)
    mask = torch.arange(11)[None, None, None, :] <= torch.tensor([4, 10, 7])[:, None, None, None]
    expected = F.scaled_dot_product_attention(
        q, keys.repeat_interleave(3, 1), values.repeat_interleave(3, 1), attn_mask=mask
    )
    torch.testing.assert_close(decode_attention(q, keys, values, mask), expected)


def test_decode_cache_write_lands_at_each_rows_slot_and_position() -> None:
    cache = torch.zeros(4, 2, 8, 3)
    new = torch.arange(3 * 2 * 3, dtype=torch.float32).view(3, 2, 1, 3) + 1
    Batch([3, 0, 2], [5, 1, 7], 1).write(cache, new)
    expected = torch.zeros(4, 2, 8, 3)
    for row, (slot, pos) in enumerate([(3, 5), (0, 1), (2, 7)]):
        expected[slot, :, pos] = new[row, :, 0]
    assert torch.equal(cache, expected)


def test_one_decode_batch_writes_caches_of_different_lengths_at_the_same_positions() -> None:
    """The engine's cache and an audit's (or a shorter one) share a step's `Batch`: each gets
    the token at its own (slot, position), whatever was written through the batch before."""
    batch = Batch([1, 0], [3, 5], 1)
    new = torch.arange(2 * 2 * 1 * 3, dtype=torch.float32).view(2, 2, 1, 3) + 1
    for length in (8, 6, 8):
        cache = torch.zeros(2, 2, length, 3)
        batch.write(cache, new)
        assert torch.equal(cache[1, :, 3], new[0, :, 0])
        assert torch.equal(cache[0, :, 5], new[1, :, 0])
        assert int((cache != 0).sum()) == new.numel()


def test_only_a_model_run_wholly_here_on_plain_kernels_prefills_prompts_together() -> None:
    class OtherMethod:  # any strategy that is not the plain TD kernel (masked, offloaded, ...)
        def __init__(self) -> None:
            self.plain = PlainCpuMethod()

        def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
            self.plain.create_weights(layer, dtype)

        def load_weight(self, layer: Linear, weight: torch.Tensor, row_offset: int = 0) -> None:
            self.plain.load_weight(layer, weight, row_offset)

        def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
            return self.plain.apply(layer, x)

    assert tiny_model().prefills_together()
    other = LinearMethodTable([("model.layers.1.mlp.*", OtherMethod())])
    assert not tiny_model(methods=other).prefills_together()
    placed = tiny_model()
    placed.prefix = lambda tokens, batch: tokens  # type: ignore[assignment]  # blocks run elsewhere
    assert not placed.prefills_together()


def test_decode_window_over_slots_with_a_gap_equals_the_batch_it_covers() -> None:
    """Eager, no compiler: the window reads slots 0..3 as one view, computes the idle slots'
    rows and drops them; logits and cache writes are those of a plain decode `Batch`."""
    model = tiny_model()
    caches = [KVCache(model.cfg, 4, 32, torch.float32) for _ in range(2)]
    prompts = [[5, 17, 3], [9, 1, 60, 2, 11], [33], [70, 71]]
    with torch.inference_mode():
        for cache in caches:
            for slot, prompt in enumerate(prompts):
                model(torch.tensor([prompt]), Batch([slot], [0], len(prompt)), cache)
        tokens = torch.tensor([[4], [6]])
        plain = Batch([1, 3], [5, 2], 1)
        window = DecodeWindow.covering(plain)
        want = model(tokens, plain, caches[0])
        got = model.tail(model.embed_tokens(tokens), window, caches[1], 0)
    assert window.rows == 4 and window.slots == [1, 3]
    torch.testing.assert_close(got, want)
    for layer in range(model.cfg.num_layers):
        torch.testing.assert_close(caches[1].k[layer], caches[0].k[layer])
        torch.testing.assert_close(caches[1].v[layer], caches[0].v[layer])


def test_a_one_row_window_equals_the_lone_sequences_batch_bit_for_bit() -> None:
    """The one-row window attends without scatter, gather or mask: the same logits and cache
    writes as a plain decode `Batch` of the sequence in slot 0, exactly."""
    model = tiny_model()
    caches = [KVCache(model.cfg, 2, 32, torch.float32) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(torch.tensor([[9, 1, 60, 2, 11]]), Batch([0], [0], 5), cache)
        token = torch.tensor([[4]])
        plain = Batch([0], [5], 1)
        window = DecodeWindow.covering(plain)
        want = model(token, plain, caches[0])
        got = model.tail(model.embed_tokens(token), window, caches[1], 0)
    assert window.rows == 1
    assert torch.equal(got, want)
    for layer in range(model.cfg.num_layers):
        assert torch.equal(caches[1].k[layer], caches[0].k[layer])


def test_decode_window_sends_a_lone_sequence_twice_unless_it_is_in_slot_0() -> None:
    """Two shapes for a compiled step: one row (slot 0 alone), or two rows or more."""
    later = DecodeWindow.covering(Batch([2], [7], 1))
    assert later.slots == [2, 2] and later.rows == 3
    first = DecodeWindow.covering(Batch([0], [7], 1))
    assert first.slots == [0] and first.rows == 1
    assert DecodeWindow.covering(Batch([0, 1], [7, 3], 1)).slots == [0, 1]


def test_rotate_equals_rotate_half_rope_bit_for_bit() -> None:
    """`rotate` with the pre-signed table is the reference `apply_rope`, bit for bit, in bf16
    and fp32, over a layout of q and k heads side by side."""
    cos, sin = rope_tables(64, 10000.0, 32)
    positions = torch.tensor([[3], [17], [31]])
    for dtype in (torch.float32, torch.bfloat16):
        c, s = cos.to(dtype)[positions][:, :, None], sin.to(dtype)[positions][:, :, None]
        signed = signed_sin(sin).to(dtype)[positions][:, :, None]
        x = torch.randn(3, 1, 12, 64).to(dtype)  # [B, T, heads, head_dim]
        assert torch.equal(rotate(x, c, signed), apply_rope(x, c, s))
