"""The token embedding kept as its GGUF blocks, its rows decoded when they are looked up.

A quantized GGUF stores the embedding quantized (Q8_0 in llama.cpp's Q4/Q8 files). Decoded
whole into the model's dtype it is the largest tensor in memory at a 128k vocabulary (0.53 GB
of bf16 at the Llama-3.2-1B shape, against 0.28 GB of Q8_0 blocks), and a step only reads the
rows of its tokens. `BlockEmbedding` keeps the blocks in TD memory (a file's map is copied: the
host can change the file under it; fresh blocks, a sealed model's decrypted buffer, are kept as
they are, with no second plaintext copy) and decodes the rows a step asks for (Q8_0's
``d * q`` in torch, other types with `GgufQuantized.dequantize`), then rounds them to the
model's dtype: the values the float table held, bit for bit (tested),
as llama.cpp's ``get_rows`` does on its quantized embedding.

The loader (`Transformer.load_weights`) installs it only where nothing else reads the float
table: a tied lm_head must take the embedding's blocks itself (a quantized method,
`TakesGgufBlocks`), not share the table (`PlainCpuMethod`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tdllm.model.gguf_blocks import GgufQuantized


class BlockEmbedding(nn.Module):
    """``forward(tokens [..]) -> [.., hidden]`` in `dtype`, like ``nn.Embedding``, from the
    GGUF `blocks` of a ``[vocab, hidden]`` table."""

    blocks: torch.Tensor

    def __init__(self, blocks: GgufQuantized, dtype: torch.dtype) -> None:
        super().__init__()
        self.kind = blocks.kind
        self.num_embeddings, self.embedding_dim = blocks.shape
        self.dtype = dtype
        array = blocks.blocks
        fresh = (
            array.flags.writeable and array.flags.c_contiguous and not isinstance(array, np.memmap)
        )
        if not fresh:  # a view of a mapped file (read-only): copied into TD memory, its pages
            array = _copied(blocks)  # let go as they are copied (8B: a 0.5 GB transient)
        # a buffer, so a failed load's scrub (`loader._zero`) reaches it
        self.register_buffer("blocks", torch.from_numpy(array), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        if not flat.numel():
            return torch.empty(*tokens.shape, self.embedding_dim, dtype=self.dtype)
        picked = self.blocks.index_select(0, flat)  # the rows' blocks (IndexError out of range)
        if self.kind == "Q8_0":  # llama.cpp's embeddings: d * q in torch (1.5x the numpy lookup)
            groups = picked.view(len(flat), -1, _Q8_0_BYTES)
            scale = groups[..., :2].contiguous().view(torch.float16).float()
            values = (groups[..., 2:].view(torch.int8).float() * scale).reshape(len(flat), -1)
        else:
            part = GgufQuantized(self.kind, (len(flat), self.embedding_dim), picked.numpy())
            values = part.dequantize()
        return values.to(self.dtype).reshape(*tokens.shape, self.embedding_dim)

    def as_gguf(self) -> GgufQuantized:
        """The table's blocks (a view of this module's copy)."""
        shape = (self.num_embeddings, self.embedding_dim)
        return GgufQuantized(self.kind, shape, self.blocks.numpy())

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.kind} blocks"


_Q8_0_BYTES = 34  # a Q8_0 block: fp16 d, then 32 int8 codes
_COPY_ROWS = 4096  # rows copied at a time: 17 MiB of the 8B shape's Q8_0 table


def _copied(blocks: GgufQuantized) -> np.ndarray:
    out = np.empty(blocks.blocks.shape, dtype=np.uint8)
    for start in range(0, blocks.rows, _COPY_ROWS):
        stop = min(start + _COPY_ROWS, blocks.rows)
        out[start:stop] = blocks.blocks[start:stop]
        blocks.taken(start, stop)
    return out
