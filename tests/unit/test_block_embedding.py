"""The embedding kept as its GGUF blocks (tdllm.model.block_embedding): its rows are the float
table's, bit for bit; a quantized load keeps it so and runs exactly as with the float table; a
tied head that shares the table keeps the float table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tdllm.model.block_embedding import BlockEmbedding
from tdllm.model.gguf_blocks import GgufQuantized
from tdllm.model.int4_methods import Int4WeightOnlyMethod
from tdllm.model.linear import LinearMethodTable, PlainCpuMethod
from tdllm.model.loader import load_model
from tdllm.model.quantized import quant_table
from tdllm.model.transformer import Batch, KVCache, Transformer
from tdllm.sources import open_checkpoint
from tests.cpu_kernels import needs_avx2
from tests.tiny_model import TINY, tiny_tensors
from tests.unit.test_gguf_quant_load import blocks_of, synthetic


def float_table(blocks: GgufQuantized, dtype: torch.dtype) -> nn.Embedding:
    """What the loader made before: the whole table dequantized, rounded to `dtype`."""
    return nn.Embedding.from_pretrained(blocks.dequantize().to(dtype), freeze=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q4_K"])
def test_looked_up_rows_are_the_float_tables_bit_for_bit(kind: str, dtype: torch.dtype) -> None:
    blocks = synthetic(kind, 300, 512, seed=3)
    embedding = BlockEmbedding(blocks, dtype)
    reference = float_table(blocks, dtype)
    tokens = torch.tensor([[0, 299, 5, 5, 17], [42, 0, 1, 298, 150]])  # repeats, both ends
    got, want = embedding(tokens), reference(tokens)
    assert got.dtype == dtype and got.shape == (2, 5, 512)
    assert torch.equal(
        got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )
    assert embedding(torch.zeros(0, dtype=torch.long)).shape == (0, 512)


def test_copies_a_files_map_and_keeps_fresh_blocks_as_they_are(tmp_path: Path) -> None:
    blocks = synthetic("Q8_0", 64, 64)
    path = tmp_path / "blocks.bin"
    blocks.blocks.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=blocks.blocks.shape)
    embedding = BlockEmbedding(GgufQuantized("Q8_0", (64, 64), mapped), torch.float32)
    before = embedding(torch.tensor([3])).clone()
    writer = np.memmap(path, dtype=np.uint8, mode="r+", shape=blocks.blocks.shape)
    writer[3] = 0  # the host rewriting the file under the map
    writer.flush()
    assert mapped[3].sum() == 0 and torch.equal(embedding(torch.tensor([3])), before)
    # a sealed model's decrypted blocks: fresh memory, kept without a second plaintext copy
    fresh = BlockEmbedding(blocks, torch.float32)
    assert fresh.blocks.data_ptr() == blocks.blocks.ctypes.data


def test_a_token_outside_the_vocabulary_is_an_index_error_as_with_nn_embedding() -> None:
    embedding = BlockEmbedding(synthetic("Q8_0", 64, 64), torch.float32)
    for bad in (64, -65):
        with pytest.raises(IndexError):
            embedding(torch.tensor([[1, bad]]))


def run(model: Transformer, prompt: list[int], steps: int = 4) -> list[torch.Tensor]:
    cache = KVCache(model.cfg, 1, len(prompt) + steps, model.dtype)
    logits = [model(torch.tensor([prompt]), Batch([0], [0], len(prompt)), cache)[0, -1]]
    for step in range(steps):
        token = int(logits[-1].argmax())
        batch = Batch([0], [len(prompt) + step], 1)
        logits.append(model(torch.tensor([[token]]), batch, cache)[0, -1])
    return logits


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_quantized_load_keeps_the_q8_0_embedding_as_blocks_and_runs_as_with_floats(
    quant: str,
) -> None:
    checkpoint = open_checkpoint("bundled")
    model, _ = load_model(checkpoint, torch.bfloat16, quant_table(quant))
    embedding = model.embed_tokens
    assert isinstance(embedding, BlockEmbedding) and embedding.kind == "Q8_0"
    # 34 bytes per 32 weights instead of bf16's 64, and no float table anywhere in the model
    vocab, hidden = checkpoint.config.vocab_size, checkpoint.config.hidden_size
    assert embedding.blocks.numel() == vocab * hidden // 32 * 34
    assert not any(t.shape == (vocab, hidden) for t in model.parameters())
    prompt = checkpoint.tokenizer.encode("The capital of France is")
    with torch.inference_mode():
        with_blocks = run(model, prompt)
        model.embed_tokens = float_table(embedding.as_gguf(), torch.bfloat16)
        with_floats = run(model, prompt)
    for got, want in zip(with_blocks, with_floats, strict=True):
        assert torch.equal(got, want)


def test_a_tied_head_on_plain_kernels_keeps_the_float_table_it_shares() -> None:
    tied = dataclasses.replace(TINY, tie_word_embeddings=True)
    table = LinearMethodTable([("lm_head", PlainCpuMethod())], Int4WeightOnlyMethod())
    model = Transformer(tied, table)
    assert model.takes_blocks()  # so the embedding does arrive as blocks
    with torch.no_grad():
        model.load_weights(blocks_of(tiny_tensors(tied)))
        model.after_load()
    assert isinstance(model.embed_tokens, nn.Embedding)
    assert model.lm_head.weight is model.embed_tokens.weight


# w8a8-avx2: its head would hold a tied Q8_0 table exactly (tests/unit/test_head_embedding.py)
@pytest.mark.parametrize("quant", ["int8", pytest.param("w8a8-avx2", marks=needs_avx2)])
def test_an_untied_quantized_model_keeps_its_embedding_as_blocks(quant: str) -> None:
    model = Transformer(TINY, quant_table(quant))
    assert not TINY.tie_word_embeddings
    with torch.no_grad():
        model.load_weights(blocks_of(tiny_tensors(TINY)))
        model.after_load()
    assert isinstance(model.embed_tokens, BlockEmbedding)
