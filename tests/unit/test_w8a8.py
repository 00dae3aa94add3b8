"""W8A8 projections (`Int8DynamicMethod`): int8 weights and activations rounded to 8 bits per
row, FBGEMM's int8 GEMM. The attack first: FBGEMM would take one rounding range per call, so
an outlier row sent by one request would coarsen the rounding of every other request's rows in
the batch (and its result would depend on who else is in it). Each row must be rounded on its
own grid: alone or beside any other rows, bit for bit."""

from __future__ import annotations

import itertools

import pytest
import torch

from tdllm.cli import main
from tdllm.errors import ModelLoadError
from tdllm.model import avx512_kernel, w8a8_packed
from tdllm.model.int8_methods import (
    Int8DynamicMethod,
    Int8WeightOnlyMethod,
    int8_quantize,
    int8_weights,
)
from tdllm.model.linear import Linear
from tdllm.model.quant_formats import W8A8_BACKENDS
from tdllm.model.quantized import quant_table
from tdllm.model.transformer import Batch, KVCache
from tests.cpu_kernels import needs_vnni
from tests.tiny_model import TINY, tiny_model


@pytest.fixture(autouse=True, params=w8a8_packed.BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs on each int8 GEMM, whichever this CPU would pick (ours where the
    CPU has AVX-512 VNNI)."""
    name = str(request.param)
    if name not in backends_here():
        pytest.skip("our W8A8 kernel needs AVX-512 VNNI")
    monkeypatch.setattr(w8a8_packed, "default_backend", lambda: name)
    return name


def backends_here() -> list[str]:
    """The int8 GEMMs this CPU runs, FBGEMM first."""
    return [
        b for b in w8a8_packed.BACKENDS if b != "avx512" or not avx512_kernel.missing_cpu_flags()
    ]


def w8a8_layer(weight: torch.Tensor, shards: list[int] | None = None) -> Linear:
    n, k = weight.shape
    layer = Linear("t", k, n, Int8DynamicMethod(), torch.float32, shards)
    start = 0
    for rows in shards or [n]:  # fused projections arrive a shard at a time
        layer.method.load_weight(layer, weight[start : start + rows], start)
        start += rows
    layer.method.after_load(layer)
    return layer


def within_half_an_activation_step(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> bool:
    """Each output is the product with the dequantized weight, up to rounding every input of
    its own row to a grid of ``max|row| / 127``: ``|err| <= sum|w| * step / 2`` (+ fp32 slack)."""
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    bound = step / 2 * w.abs().sum(dim=1) * 1.001 + 1e-5
    return bool(((y - x @ w.T).abs() <= bound).all())


@needs_vnni
@pytest.mark.parametrize(
    ("shards", "in_features", "rows"),
    [([96], 64, 1), ([64, 32, 32], 128, 8), ([160, 160], 96, 130), ([3000], 40, 3)],
)
def test_w8a8_is_the_int8_weight_product_within_half_an_activation_step(
    shards: list[int], in_features: int, rows: int
) -> None:
    g = torch.Generator().manual_seed(in_features + rows)
    weight = torch.randn(sum(shards), in_features, generator=g) * 0.1
    layer = w8a8_layer(weight, shards)
    q, scales = int8_quantize(weight)
    dequantized = q.float() * scales[:, None]
    x = torch.randn(rows, in_features, generator=g) * torch.logspace(-2, 2, rows)[:, None]
    y = layer(x)
    assert y.shape == (rows, sum(shards)) and y.dtype == torch.float32
    assert within_half_an_activation_step(x, y, dequantized)


@needs_vnni
def test_an_outlier_row_does_not_change_the_rounding_of_the_other_rows() -> None:
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(48, 64, generator=g) * 0.1
    layer = w8a8_layer(weight)
    victim = torch.randn(1, 64, generator=g)
    attacker = torch.zeros(1, 64)
    # a prompt crafted to blow up activations of both signs: it would widen a shared range
    # (if rows were not scaled) and make it symmetric (if the range columns were missing)
    attacker[0, 3], attacker[0, 9] = 1e4, -1e4
    alone = layer(victim)
    for batch in (torch.cat([victim, attacker]), torch.cat([attacker, victim, attacker])):
        together = layer(batch)
        row = 0 if batch.shape[0] == 2 else 1
        assert torch.equal(together[row], alone[0])
    q, scales = int8_quantize(weight)
    assert within_half_an_activation_step(victim, alone, q.float() * scales[:, None])


@needs_vnni
def test_w8a8_holds_the_weights_int8_holds() -> None:
    weight = torch.randn(70, 96) * torch.logspace(-3, 1, 70)[:, None]
    w8a8 = w8a8_layer(weight)
    int8 = Linear("t", 96, 70, Int8WeightOnlyMethod(), torch.float32)
    int8.method.load_weight(int8, weight)
    int8.method.after_load(int8)
    q, scales = int8_weights(w8a8)
    assert torch.equal(q, int8_weights(int8)[0])
    assert torch.equal(scales, int8_quantize(weight)[1])  # fp32 scales: int8's are bf16
    # nothing of the weights stays outside FBGEMM's packing: no staged rows, no buffers
    assert not dict(w8a8.named_buffers()) and not dict(w8a8.named_parameters())


def test_w8a8_is_refused_on_a_cpu_without_vnni(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ModelLoadError, match="w8a8 needs a CPU with VNNI"):
        Linear("t", 64, 32, Int8DynamicMethod(vnni=False), torch.float32)
    # where users meet it: one line and an exit code, before any weight is read
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--quant", "w8a8", "--max-tokens", "2", "Hi"])
    assert exit_info.value.code == ModelLoadError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("error: quant w8a8 needs a CPU with VNNI") and err.count("\n") == 1


@needs_vnni
@pytest.mark.parametrize("shards", [[500], [130, 170, 200]])
def test_a_projection_packed_in_row_chunks_gives_what_one_matrix_gives(
    monkeypatch: pytest.MonkeyPatch, shards: list[int]
) -> None:
    """A large projection (the 1B shape's head) is packed as several FBGEMM matrices, each
    chunk's staged rows freed once copied: same weights, same products bit for bit, a shard
    crossing chunk boundaries lands in the right rows, and nothing staged stays behind."""
    g = torch.Generator().manual_seed(11)
    weight = torch.randn(500, 62, generator=g) * torch.logspace(-2, 1, 500)[:, None]
    whole = w8a8_layer(weight, shards)
    monkeypatch.setattr(w8a8_packed, "CHUNK_BYTES", 128 * 64)  # 128 rows of 64 bytes
    chunked = w8a8_layer(weight, shards)
    assert w8a8_packed.chunk_count(whole.w8a8_handle) == 1
    assert w8a8_packed.chunk_count(chunked.w8a8_handle) == 4
    assert all(map(torch.equal, int8_weights(chunked), int8_weights(whole)))
    x = torch.randn(9, 62, generator=g)
    assert torch.equal(chunked(x), whole(x))
    assert not dict(chunked.named_buffers())


@needs_vnni
def test_the_packed_bytes_are_the_int8_weights_and_a_few_numbers_per_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the bench's peak-RSS target counts for a packed projection, in one chunk or four."""
    weight = torch.randn(256, 128, generator=torch.Generator().manual_seed(3))
    for chunk_bytes in (w8a8_packed.CHUNK_BYTES, 64 * 130):
        monkeypatch.setattr(w8a8_packed, "CHUNK_BYTES", chunk_bytes)
        layer = w8a8_layer(weight)  # held: the handle is forgotten with its layer
        held = w8a8_packed.packed_bytes(layer.w8a8_handle)
        assert 256 * 128 <= held <= 256 * (128 + 16)


def test_row_chunks_cover_the_rows_once_each_within_the_byte_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(w8a8_packed, "CHUNK_BYTES", 1000)
    for rows, cols in [(1, 5), (7, 1000), (10, 999), (1001, 3), (128256, 7)]:
        spans = w8a8_packed.chunk_spans(rows, cols)
        assert spans[0][0] == 0 and spans[-1][1] == rows
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        assert all(stop > start for start, stop in spans)
        assert all((stop - start) * cols <= 1000 for start, stop in spans) or len(spans) == rows


@needs_vnni
def test_a_zero_row_gives_zeros_and_an_empty_batch_an_empty_result() -> None:
    layer = w8a8_layer(torch.randn(24, 32))
    assert torch.equal(layer(torch.zeros(2, 32)), torch.zeros(2, 24))
    assert layer(torch.zeros(0, 32)).shape == (0, 24)


@needs_vnni
def test_w8a8_keeps_q_k_v_weight_only_and_its_batched_prefill_equals_one_at_a_time() -> None:
    table = quant_table("w8a8")
    assert type(table.method_for("model.layers.0.self_attn.qkv_proj")) is Int8WeightOnlyMethod
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        assert isinstance(table.method_for(name), Int8DynamicMethod)
    model = tiny_model(TINY, table)
    prompts = [[5, 9, 13, 2], [44, 7, 1, 30]]
    cache = KVCache(model.cfg, 2, 16, torch.float32)
    together = model(torch.tensor(prompts), Batch([0, 1], [0, 0], 4), cache)
    for slot, prompt in enumerate(prompts):
        alone_cache = KVCache(model.cfg, 1, 16, torch.float32)
        alone = model(torch.tensor([prompt]), Batch([0], [0], 4), alone_cache)
        assert torch.equal(together[slot], alone[0])


@needs_vnni
def test_every_backend_computes_the_same_product() -> None:
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(300, 80, generator=g) * torch.logspace(-2, 1, 300)[:, None]
    x = torch.randn(17, 80, generator=g) * torch.logspace(-3, 3, 17)[:, None]
    layers = {}
    for name in backends_here():
        layer = Linear("t", 80, 300, Int8DynamicMethod(backend=name), torch.float32)
        layer.method.load_weight(layer, weight)
        layers[name] = layer
    fbgemm = layers["fbgemm"](x)
    for name in backends_here()[1:]:
        other = layers[name](x)
        # the same rounded inputs and int32 sums; only the last float scaling may differ by an ulp
        assert torch.allclose(fbgemm, other, rtol=1e-5, atol=1e-6 * float(fbgemm.abs().max()))
        assert all(map(torch.equal, int8_weights(layers["fbgemm"]), int8_weights(layers[name])))


@needs_vnni
def test_each_w8a8_quant_is_w8a8_on_its_gemm_with_the_same_greedy_tokens() -> None:
    quants = {
        quant: backend for quant, backend in W8A8_BACKENDS.items() if backend in backends_here()
    }
    tables = {quant: quant_table(quant) for quant in quants}
    for quant, backend in quants.items():
        table = tables[quant]
        assert type(table.method_for("model.layers.0.self_attn.qkv_proj")) is Int8WeightOnlyMethod
        for name in ("model.layers.1.mlp.down_proj", "lm_head"):
            method = table.method_for(name)
            assert isinstance(method, Int8DynamicMethod) and method.backend == backend
    models = {quant: tiny_model(TINY, table) for quant, table in tables.items()}
    tokens = {}
    for quant, model in models.items():
        cache = KVCache(model.cfg, 1, 24, torch.float32)
        seq, logits = [5, 9, 13, 2], []
        for step in range(8):  # greedy: a prefill, then one token a step
            ids = seq if step == 0 else seq[-1:]
            out = model(torch.tensor([ids]), Batch([0], [len(seq) - len(ids)], len(ids)), cache)
            logits.append(out[0, -1])
            seq.append(int(out[0, -1].argmax()))
        tokens[quant] = (seq, torch.stack(logits))
    fb_seq, fb_logits = tokens["w8a8"]
    assert len(tokens) == len(quants) > 1
    for seq, logits in tokens.values():
        assert seq == fb_seq
        assert torch.allclose(
            fb_logits, logits, rtol=1e-4, atol=1e-4 * float(fb_logits.abs().max())
        )


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown W8A8 backend 'mkl'"):
        w8a8_packed.pack([torch.zeros(2, 6, dtype=torch.int8)], torch.ones(2), lambda _: None,
                         Int8DynamicMethod(), "mkl")  # fmt: skip
