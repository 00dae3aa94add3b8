"""The embedding read from the tied head's rows (tdllm.model.head_embedding): where the head holds
the file's Q8_0 blocks exactly, the model holds the table once and runs bit for bit as with the
embedding's own blocks; anywhere else the embedding keeps a table of its own."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gguf import GGMLQuantizationType, quantize

from tdllm.model import avx2_kernel
from tdllm.model.block_embedding import BlockEmbedding
from tdllm.model.checkpoint import GgufTensors
from tdllm.model.gguf_blocks import GgufQuantized
from tdllm.model.head_embedding import HeadEmbedding
from tdllm.model.int8_methods import Int8GroupAvx2Method
from tdllm.model.linear import LinearMethodTable
from tdllm.model.loader import load_model
from tdllm.model.quantized import quant_table
from tdllm.model.transformer import Transformer
from tdllm.sources import open_checkpoint
from tests.cpu_kernels import needs_avx2
from tests.tiny_model import TINY, tiny_tensors
from tests.unit.test_block_embedding import run
from tests.unit.test_gguf_quant_load import blocks_of

pytestmark = needs_avx2


def test_rows_read_from_the_packed_layout_are_the_packed_rows() -> None:
    avx2_kernel.load("w8a8-avx2")
    n, k = 200, 96  # a last block of 8 rows past three full ones
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=generator)
    scales = torch.rand(n, k // 32, generator=generator)
    packed = avx2_kernel.empty8(n, k)
    avx2_kernel.pack8_into(packed, 0, codes, scales)
    q, s = avx2_kernel.unpack8(packed, n, k)
    # one rounding of q * scale (exact in float64 for these values)
    exact = q.double().reshape(n, -1, 32) * s.double()[..., None]
    want = exact.reshape(n, k).float()
    rows = torch.tensor([0, 199, 5, 5, 64, 63, 128, 192])
    assert torch.equal(avx2_kernel.rows8(packed, rows, n, k), want[rows])
    assert avx2_kernel.rows8(packed, rows[:0], n, k).shape == (0, k)
    for bad in (n, n + 20, -1):  # rows 200..255 are the layout's padding
        with pytest.raises(IndexError):
            avx2_kernel.rows8(packed, torch.tensor([3, bad]), n, k)


@pytest.fixture(scope="module")
def bundled_q8_0_embedding() -> GgufQuantized:
    stream = open_checkpoint("bundled").tensors
    assert isinstance(stream, GgufTensors)
    blocks = dict(stream.with_blocks())["model.embed_tokens.weight"]
    assert isinstance(blocks, GgufQuantized) and blocks.kind == "Q8_0"
    return blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tied_q8_0_embedding_is_read_from_the_head_as_its_blocks_decode(
    dtype: torch.dtype, bundled_q8_0_embedding: GgufQuantized
) -> None:
    checkpoint = open_checkpoint("bundled")
    model, _ = load_model(checkpoint, dtype, quant_table("w8a8-avx2"))
    embedding = model.embed_tokens
    assert isinstance(embedding, HeadEmbedding)
    # the table once: the head's packed rows, no blocks or float table beside them
    vocab, hidden = checkpoint.config.vocab_size, checkpoint.config.hidden_size
    tensors = (*model.parameters(), *model.buffers())
    tables = [t for t in tensors if t.numel() * t.element_size() >= vocab * hidden // 32 * 34]
    assert len(tables) == 1 and tables[0] is model.lm_head.qweight
    assert not any(isinstance(m, BlockEmbedding) for m in model.modules())
    own = BlockEmbedding(bundled_q8_0_embedding, dtype)
    tokens = torch.tensor([[0, vocab - 1, 5, 5, 17], [42, 0, 1, 12345, vocab // 2]])
    got, want = embedding(tokens), own(tokens)
    assert got.dtype == dtype and got.shape == (2, 5, hidden)
    assert torch.equal(got, want)
    assert embedding(torch.zeros(0, dtype=torch.long)).shape == (0, hidden)
    prompt = checkpoint.tokenizer.encode("The capital of France is")
    with torch.inference_mode():
        from_head = run(model, prompt)
        model.embed_tokens = own
        from_blocks = run(model, prompt)
    for a, b in zip(from_head, from_blocks, strict=True):
        assert torch.equal(a, b)


def tiny_tied(table: LinearMethodTable, embedding_kind: str = "Q8_0") -> Transformer:
    """The tiny model, tied, loaded from GGUF blocks: its embedding as `embedding_kind`."""
    tied = dataclasses.replace(TINY, tie_word_embeddings=True)
    model = Transformer(tied, table)
    tensors = []
    for name, tensor in blocks_of(tiny_tensors(tied)):
        if name == "model.embed_tokens.weight" and embedding_kind != tensor.kind:
            raw = quantize(tensor.dequantize().numpy(), GGMLQuantizationType[embedding_kind])
            tensor = GgufQuantized(embedding_kind, tensor.shape, raw)
        tensors.append((name, tensor))
    with torch.no_grad():
        model.load_weights(tensors)
        model.after_load()
    return model


def test_a_token_outside_the_vocabulary_is_an_index_error_as_with_nn_embedding() -> None:
    model = tiny_tied(quant_table("w8a8-avx2"))
    assert isinstance(model.embed_tokens, HeadEmbedding)
    vocab = TINY.vocab_size
    for bad in (vocab, vocab + 20, -1, -vocab - 1):  # rows 97..127: the layout's padding
        with pytest.raises(IndexError):
            model.embed_tokens(torch.tensor([[1, bad]]))
    with pytest.raises(TypeError, match="not a table"):
        model.float_embedding()


def test_an_embedding_the_head_would_requantize_keeps_its_own_blocks() -> None:
    # Q4_0 on the head's int8 grid is a requantization: reading the embedding from the head
    # would change its values, so it stays its own blocks
    table = LinearMethodTable([("lm_head", Int8GroupAvx2Method())], quant_table("int4").default)
    model = tiny_tied(table, "Q4_0")
    assert isinstance(model.embed_tokens, BlockEmbedding) and model.embed_tokens.kind == "Q4_0"
