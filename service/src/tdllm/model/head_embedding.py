"""The token embedding read from the tied lm_head's own rows: one copy of the table, not two.

A tied model's embedding and head are one ``[vocab, hidden]`` table, which llama.cpp's Q4 and Q8
files store Q8_0. Kept as its blocks (`BlockEmbedding`) beside a head packed for an int8 kernel,
the table was held twice: 0.28 GB of blocks and 0.30 GB of packed head at the Llama-3.2-1B
shape, where the layers' int4 weights are 0.58 GB. Where the head's method holds a block type
exactly (``Int8GroupAvx2Method`` and Q8_0: the same codes and fp16 scales), the loader packs the
head straight from the file's embedding and the embedding decodes its tokens' rows from the
head (`HeadEmbedding`): the values `BlockEmbedding` gave, bit for bit (tested), with no table
of its own and no copy of the blocks during the load.

Any other type (a Q4 or F16 embedding, a head requantizing it) keeps its own table: reading it
from the head would change the embedding's values.
"""

from __future__ import annotations

import functools
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from tdllm.model.gguf_blocks import GgufQuantized, TakesGgufBlocks
from tdllm.model.linear import Linear


@runtime_checkable
class HoldsRowsExactly(Protocol):
    """A `LinearMethod` that can give back its weight's rows as a GGUF type's blocks decode."""

    def holds_exactly(self, kind: str) -> bool:
        """Whether blocks of GGUF type `kind` are held as they are (their decoded values)."""
        ...

    def rows(self, layer: Linear, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (int64) of `layer`'s weight, decoded to fp32 ``[T, in]``; IndexError for
        a row outside the weight."""
        ...


class HeadEmbedding(nn.Module):
    """``forward(tokens [..]) -> [.., hidden]`` in `dtype`, like ``nn.Embedding``, from the rows
    of the tied `head` (whose method `HoldsRowsExactly`)."""

    def __init__(self, head: Linear, dtype: torch.dtype) -> None:
        super().__init__()
        method = head.method
        assert isinstance(method, HoldsRowsExactly)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.dtype = dtype
        # a function, not the head as a submodule: the head is the model's `lm_head`, and a
        # second path to it would count its memory twice and scrub it twice
        self._rows = functools.partial(method.rows, head)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self._rows(tokens.reshape(-1))  # IndexError outside the vocabulary
        return rows.to(self.dtype).reshape(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the tied lm_head"


def embedding_from_head(
    head: Linear, blocks: GgufQuantized, dtype: torch.dtype
) -> HeadEmbedding | None:
    """For a tied model's embedding `blocks`: where `head`'s method holds their type exactly,
    the head packed from them (the file's pages let go as rows are taken, no copy of the blocks)
    and the embedding that reads the head's rows; None, with nothing loaded, anywhere else."""
    method = head.method
    if not (
        isinstance(method, HoldsRowsExactly)
        and isinstance(method, TakesGgufBlocks)
        and method.holds_exactly(blocks.kind)
    ):
        return None
    method.load_blocks(head, blocks)
    return HeadEmbedding(head, dtype)
