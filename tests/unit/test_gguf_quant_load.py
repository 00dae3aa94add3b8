"""GGUF blocks straight into the int kernels (tdllm.model.gguf_blocks, staged_quant.py's
`load_blocks`): our reading of the blocks is gguf's, bit for bit; the int4 kernel on them
computes the product with gguf's weight up to the bf16 rounding of its scales; the bundled model
loads to the very same kernels as through floats; bad blocks are clear errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from tdllm.errors import ModelLoadError
from tdllm.model.checkpoint import Checkpoint, GgufTensors
from tdllm.model.gguf_blocks import GgufQuantized
from tdllm.model.int4_methods import Int4WeightOnlyMethod, int4_pack
from tdllm.model.int8_methods import Int8WeightOnlyMethod, int8_quantize, int8_weights
from tdllm.model.linear import Linear
from tdllm.model.loader import load_model
from tdllm.model.quantized import quant_table
from tdllm.model.staged_quant import KERNEL_DTYPE
from tdllm.model.transformer import Batch, KVCache, Transformer
from tdllm.sources import open_checkpoint
from tests.tiny_model import TINY, tiny_tensors


def gguf_float(blocks: GgufQuantized) -> np.ndarray:
    """The reference: gguf's own dequantize of the same bytes."""
    array = dequantize(blocks.blocks, GGMLQuantizationType[blocks.kind])
    return np.asarray(array, dtype=np.float32).reshape(blocks.shape)


def bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))


def synthetic(kind: str, rows: int, cols: int, seed: int = 0) -> GgufQuantized:
    """Blocks of `kind`: gguf's own quantizer where it has one; Q4_K (which gguf only reads) as
    random bytes with finite fp16 ``d`` and ``dmin`` (every such byte string is a valid block)."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    if kind != "Q4_K":
        return GgufQuantized(kind, (rows, cols), quantize(weight, GGMLQuantizationType[kind]))
    raw = rng.integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
    scales = (rng.random((rows, cols // 256, 2)) * 0.004).astype(np.float16)
    raw[..., 0:4] = scales.view(np.uint8)
    return GgufQuantized(kind, (rows, cols), raw.reshape(rows, -1))


@pytest.fixture(scope="module")
def bundled_blocks() -> dict[str, GgufQuantized]:
    stream = open_checkpoint("bundled").tensors
    assert isinstance(stream, GgufTensors)
    return {n: t for n, t in stream.with_blocks() if isinstance(t, GgufQuantized)}


def test_the_bundled_files_blocks_read_by_us_dequantize_exactly_as_gguf(
    bundled_blocks: dict[str, GgufQuantized],
) -> None:
    kinds = {b.kind for b in bundled_blocks.values()}
    assert kinds == {"Q4_1", "Q8_0"}  # every projection Q4_1, the tied embedding Q8_0
    for name in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.29.mlp.gate_proj.weight",
    ):
        blocks = bundled_blocks[name]
        want = gguf_float(blocks)
        assert bit_equal(blocks.dequantize().numpy(), want), name
        # the (code, scale, offset) decoding the kernels take is that same float, op for op
        codes, scale, offset = blocks.affine()
        grouped = codes.reshape(blocks.rows, -1, 32).astype(np.float32) * scale[..., None]
        if offset is not None:
            grouped += offset[..., None]
        assert bit_equal(grouped.reshape(blocks.shape), want), name


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "Q4_K"])
def test_synthetic_blocks_dequantize_exactly_as_gguf(kind: str) -> None:
    blocks = synthetic(kind, 48, 512)
    assert bit_equal(blocks.dequantize().numpy(), gguf_float(blocks))
    assert bit_equal(blocks.dequantize(16, 40).numpy(), gguf_float(blocks)[16:40])
    codes, _, _ = blocks.affine()
    assert codes.shape == blocks.shape
    if kind != "Q8_0":
        assert codes.dtype == np.uint8 and int(codes.max()) <= 15


def test_the_blocks_stream_is_the_float_stream_with_q_and_k_rows_permuted_on_the_blocks() -> None:
    stream = open_checkpoint("bundled").tensors
    assert isinstance(stream, GgufTensors)
    floats = stream()
    seen = 0
    for (name, item), (float_name, tensor) in zip(stream.with_blocks(), floats, strict=True):
        assert name == float_name and isinstance(tensor, torch.Tensor)
        got = item.dequantize() if isinstance(item, GgufQuantized) else item
        assert torch.equal(got, tensor), name
        seen += 1
    assert seen == 272


def kernel_weight(layer: Linear) -> torch.Tensor:
    """Every weight the int4 kernel multiplies by, probed with the identity (bf16 output)."""
    eye = torch.eye(layer.in_features, dtype=KERNEL_DTYPE)
    return layer(eye).float().T


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_kernel_on_straight_loaded_blocks_is_the_product_with_ggufs_weight(kind: str) -> None:
    shards = [96, 32, 48]  # a fused q|k|v: shards at their row offsets, in any order
    blocks = synthetic(kind, sum(shards), 512, seed=1)
    want = torch.from_numpy(gguf_float(blocks))
    layer = Linear("t", 512, sum(shards), Int4WeightOnlyMethod(), torch.float32, shards)
    layer.method.load_blocks(layer, blocks.row_slice(128, 176), 128)  # type: ignore[attr-defined]
    layer.method.load_weight(layer, want[96:128], 96)  # a float shard (a type we re-quantize)
    layer.method.load_blocks(layer, blocks.row_slice(0, 96), 0)  # type: ignore[attr-defined]
    layer.method.after_load(layer)
    rows = torch.cat([torch.arange(96), torch.arange(128, 176)])  # the rows given as blocks
    # the kernel's weight: (q - 8) * bf16(scale) + bf16(zero), zero = offset + 8 * scale
    codes, scale, offset = blocks.affine()
    assert offset is not None
    d, z = torch.from_numpy(scale), torch.from_numpy(offset + 8 * scale)
    bf16 = [t.to(KERNEL_DTYPE).float()[..., None] for t in (d, z)]
    grouped = torch.from_numpy(codes).float().reshape(blocks.rows, -1, 32) - 8
    exact = (grouped * bf16[0] + bf16[1]).reshape(blocks.shape)
    # ... which is gguf's weight but for the bf16 rounding of scale and zero (<= 2^-8 each)
    slack = ((8 * d.abs() + z.abs()) * 2**-8).repeat_interleave(32, dim=1)
    assert torch.all((exact - want).abs()[rows] <= slack[rows] * (1 + 1e-6))
    probed = kernel_weight(layer)  # every weight, through the kernel, rounded to bf16
    assert torch.all((probed - exact).abs()[rows] <= exact.abs()[rows] * 2**-8)
    x = torch.randn(3, 512)
    y = layer(x)[:, rows]
    reference = x.to(KERNEL_DTYPE).float() @ exact[rows].T
    assert torch.allclose(y, reference, atol=1e-2, rtol=2**-6)
    against_gguf = x.to(KERNEL_DTYPE).float() @ want[rows].T
    bound = x.to(KERNEL_DTYPE).float().abs() @ slack[rows].T
    assert torch.all((y - against_gguf).abs() <= bound + reference.abs() * 2**-7 + 1e-2)
    assert not [n for n, _ in layer.named_buffers() if n.startswith("staged")]


def test_q4_0_blocks_keep_their_grid_where_requantizing_would_not() -> None:
    # symmetric Q4_0 rarely spans codes 0..15 in a group: int4 g32 asymmetric re-quantization
    # moves it to another grid; straight, only the bf16 rounding of d is left (zero is 0)
    blocks = synthetic("Q4_0", 64, 256, seed=2)
    want = torch.from_numpy(gguf_float(blocks))
    straight = Linear("s", 256, 64, Int4WeightOnlyMethod(), torch.float32)
    straight.method.load_blocks(straight, blocks)  # type: ignore[attr-defined]
    requantized = Linear("r", 256, 64, Int4WeightOnlyMethod(), torch.float32)
    requantized.load_weight(want)
    error = [(kernel_weight(m) - want).abs().mean() for m in (straight, requantized)]
    assert error[0] < error[1]


@pytest.mark.parametrize("rows", [48, 208, 2100])
def test_int4_packing_in_runs_of_rows_gives_the_bytes_of_packing_the_whole_projection(
    rows: int,
) -> None:
    weight = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
    layer = Linear("t", 96, rows, Int4WeightOnlyMethod(), torch.float32)
    layer.load_weight(weight)
    packed, scales_zeros = int4_pack(weight)  # all rows at once, as before
    assert torch.equal(layer.qweight, packed)
    # (the padding rows' scales: int4_pack quantized zero rows, the method leaves them zero)
    assert torch.equal(layer.scales_zeros[:, :rows], scales_zeros[:, :rows].to(KERNEL_DTYPE))


def test_int8_takes_q8_0_blocks_as_the_per_row_quantization_of_their_float() -> None:
    blocks = synthetic("Q8_0", 100, 64, seed=3)
    layer = Linear("h", 64, 100, Int8WeightOnlyMethod(), torch.float32)
    layer.method.load_blocks(layer, blocks)  # type: ignore[attr-defined]
    q, scales = int8_quantize(torch.from_numpy(gguf_float(blocks)))
    assert torch.equal(layer.qweight, q) and torch.equal(layer.scales, scales.to(KERNEL_DTYPE))


def blocks_of(tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, Any]]:
    """A tiny model's tensors as a GGUF would hand them: projections Q4_0, embedding Q8_0."""
    for name, tensor in tensors.items():
        kind = "Q8_0" if "embed" in name else "Q4_0" if tensor.dim() == 2 else None
        if kind is None:
            yield name, tensor
            continue
        raw = quantize(tensor.numpy(), GGMLQuantizationType[kind])
        yield name, GgufQuantized(kind, (tensor.shape[0], tensor.shape[1]), raw)


def test_blocks_reach_float_consumers_dequantized_and_int_methods_as_they_are() -> None:
    tied = dataclasses.replace(TINY, tie_word_embeddings=True)
    tensors = tiny_tensors(tied)
    floats = {
        n: b.dequantize() if isinstance(b, GgufQuantized) else b for n, b in blocks_of(tensors)
    }
    plain = Transformer(tied)
    with torch.no_grad():
        plain.load_weights(blocks_of(tensors))
    assert not plain.takes_blocks()
    for name, target in plain.weight_destinations().items():
        if name in floats:
            assert torch.equal(target, floats[name]), name
    quantized = Transformer(tied, quant_table("int4"))
    assert quantized.takes_blocks()
    with torch.no_grad():
        quantized.load_weights(blocks_of(tensors))
        quantized.after_load()
    # the tied head's int8 comes from the embedding's Q8_0 blocks
    q, _ = int8_quantize(floats["model.embed_tokens.weight"])
    assert torch.equal(int8_weights(quantized.lm_head)[0], q)
    tokens = torch.tensor([[5, 9, 13, 2, 44, 7]])
    logits = [
        m(tokens, Batch([0], [0], 6), KVCache(m.cfg, 1, 8, torch.float32), last_only=False)
        for m in (plain, quantized)
    ]
    assert torch.allclose(logits[0], logits[1], atol=0.25)  # Q4_0 is int4 g32's own grid


@pytest.fixture(scope="module")
def bundled_int4_both_ways() -> tuple[Transformer, Transformer, Checkpoint]:
    checkpoint = open_checkpoint("bundled")
    straight, _ = load_model(checkpoint, torch.float32, quant_table("int4"))
    # the previous path: floats (dequantized one tensor at a time), re-quantized by the methods
    stream = checkpoint.tensors
    floats = dataclasses.replace(checkpoint, tensors=lambda: stream())
    requantized, _ = load_model(floats, torch.float32, quant_table("int4"))
    return straight, requantized, checkpoint


def test_bundled_int4_from_blocks_holds_the_kernels_the_float_path_made(
    bundled_int4_both_ways: tuple[Transformer, Transformer, Checkpoint],
) -> None:
    straight, requantized, checkpoint = bundled_int4_both_ways
    # Q4_1 groups span codes 0..15, so re-quantizing their floats found the same grid: the
    # straight path gives the very same packed codes and bf16 scales and zeros, and the head
    # (int8 from the Q8_0 embedding's blocks) the same per-row int8
    buffers = dict(requantized.named_buffers())
    for name, buffer in straight.named_buffers():
        if name != "embed_tokens.blocks":  # the float path's embedding is a float table
            assert torch.equal(buffer, buffers[name]), name
    table = straight.embed_tokens(torch.arange(checkpoint.config.vocab_size))
    assert torch.equal(table, requantized.embed_tokens.weight)
    heads = int8_weights(straight.lm_head), int8_weights(requantized.lm_head)
    for part, same in zip(*heads, strict=True):
        assert torch.equal(part, same)  # the W8A8 head, read back from FBGEMM's packing
    prompt = checkpoint.tokenizer.encode("The capital of France is")
    outputs = []
    for model in (straight, requantized):
        cache = KVCache(model.cfg, 1, 32, torch.float32)
        logits = model(torch.tensor([prompt]), Batch([0], [0], len(prompt)), cache)
        out = [int(logits[0, -1].argmax())]
        for step in range(7):
            batch = Batch([0], [len(prompt) + step], 1)
            out.append(int(model(torch.tensor([[out[-1]]]), batch, cache)[0, -1].argmax()))
        outputs.append(out)
    assert outputs[0] == outputs[1]


def test_a_bf16_model_takes_its_int8_head_from_the_q8_0_blocks_not_the_bf16_embedding(
    bundled_blocks: dict[str, GgufQuantized],
) -> None:
    model, _ = load_model(open_checkpoint("bundled"), torch.bfloat16, quant_table("int4"))
    embedding = bundled_blocks["model.embed_tokens.weight"]
    q, _ = int8_quantize(embedding.dequantize())
    assert torch.equal(int8_weights(model.lm_head)[0], q)
    # the embedding stays the Q8_0 blocks the head was made from (test_block_embedding.py)
    assert torch.equal(model.embed_tokens.blocks, torch.from_numpy(embedding.blocks))


@pytest.mark.parametrize(
    ("kind", "shape", "raw_shape", "message"),
    [
        ("Q4_1", (4, 64), (4, 39), "expected 4 rows of 40 bytes"),
        ("Q4_1", (4, 64), (3, 40), "expected 4 rows"),
        ("Q4_1", (4, 48), (4, 30), "not a multiple of its block of 32"),
        ("Q4_K", (2, 128), (2, 72), "not a multiple of its block of 256"),
        ("Q9_9", (2, 32), (2, 20), "unknown GGUF tensor type"),
        ("F32", (2, 32), (2, 128), "not a quantized type"),
    ],
)
def test_malformed_blocks_are_a_clear_error(
    kind: str, shape: tuple[int, int], raw_shape: tuple[int, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        GgufQuantized(kind, shape, np.zeros(raw_shape, dtype=np.uint8))


def test_the_reader_names_the_tensor_whose_blocks_do_not_fit() -> None:
    bad = SimpleNamespace(
        name="blk.0.attn_q.weight",
        shape=[64, 32],  # GGUF order: 32 rows of 64
        tensor_type=GGMLQuantizationType.Q4_1,
        data=np.zeros((32, 39), dtype=np.uint8),
    )
    reader = SimpleNamespace(tensors=[bad], file_map=bad.data)
    stream = GgufTensors(reader, TINY, Path("x.gguf"))
    with pytest.raises(ModelLoadError, match=r"x\.gguf: tensor blk\.0\.attn_q\.weight: .*40 bytes"):
        list(stream.with_blocks())
    with pytest.raises(ModelLoadError, match=r"blk\.0\.attn_q\.weight"):
        list(stream())


def test_blocks_of_the_wrong_shape_or_rows_are_refused_by_the_model_and_the_method() -> None:
    model = Transformer(TINY, quant_table("int4"))
    wrong = synthetic("Q4_0", 16, 64)  # k_proj is 16 x 32
    with pytest.raises(ValueError, match=r"k_proj.weight has shape \(16, 64\)"):
        model.load_weights([("model.layers.0.self_attn.k_proj.weight", wrong)])
    layer = Linear("t", 64, 16, Int4WeightOnlyMethod(), torch.float32)
    with pytest.raises(ValueError, match="rows 8:24 of 16"):
        layer.method.load_blocks(layer, wrong, 8)  # type: ignore[attr-defined]
