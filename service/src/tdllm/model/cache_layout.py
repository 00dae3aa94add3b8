"""Where a forward pass's rows sit in the KV cache: `KVCache` (every layer's keys and values
for `max_batch` slots), `Batch` (each row's slot and first position, its mask, how it writes and
reads the cache) and `DecodeWindow` (a decode batch in the one shape a compiled decode step is
traced for), with `decode_attention`, the attention of one query per row over cached rows.

The network (`tdllm.model.transformer`) asks a batch to write, read and attend; it does not
know the cache's layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tdllm.model.config import ModelConfig
from tdllm.zero_pages import ZeroPages


class KVCache:
    """Keys and values of every layer for `max_batch` slots of `max_seq_len` positions each.

    A sequence owns one slot for its whole life; positions are per sequence, so sequences of
    different lengths share a decode step without padding. The slots are views of one
    `ZeroPages` mapping: a slot holds physical memory only for the positions written into it,
    and `release` hands a finished sequence's pages back (and makes its slot read as zeros), so
    `max_batch` slots of the model's whole context cost what their sequences hold, not the
    worst case.
    """

    def __init__(
        self, cfg: ModelConfig, max_batch: int, max_seq_len: int, dtype: torch.dtype
    ) -> None:
        shape = (max_batch, cfg.num_kv_heads, max_seq_len, cfg.head_dim)
        item = dtype.itemsize
        self.slot_bytes = cfg.num_kv_heads * max_seq_len * cfg.head_dim * item
        self.layer_bytes = max_batch * self.slot_bytes
        self.memory = ZeroPages(2 * cfg.num_layers * self.layer_bytes)
        tensors = [
            self.memory.tensor(i * self.layer_bytes, shape, dtype)
            for i in range(2 * cfg.num_layers)
        ]
        self.k, self.v = tensors[: cfg.num_layers], tensors[cfg.num_layers :]
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        # every layer's key and value of one position
        self.token_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * item

    def nbytes(self) -> int:
        """The whole cache's size: address space, not memory (`resident_bytes`)."""
        return self.memory.nbytes

    def resident_bytes(self) -> int:
        """The cache's bytes mapped to memory now (`ZeroPages.resident_bytes`: not for a hot
        path)."""
        return self.memory.resident_bytes()

    def release(self, slot: int) -> None:
        """Hand `slot`'s pages back to the kernel, every layer's; it reads as zeros after."""
        for i in range(len(self.k) + len(self.v)):
            self.memory.release(i * self.layer_bytes + slot * self.slot_bytes, self.slot_bytes)


@dataclass
class Batch:
    """Where each row of a forward pass sits: its cache slot and the position of its first token.

    Three shapes: one sequence with any number of tokens (a prefill, or a continuation), many
    sequences with one token each (decode), or many prompts prefilled together from position 0,
    padded to the longest (`lengths` gives each row's own; the padding's keys are masked out
    and its cache entries are overwritten before any query can see them).
    """

    slots: list[int]
    starts: list[int]
    num_tokens: int
    lengths: list[int] | None = None  # a padded prefill's real tokens per row

    def __post_init__(self) -> None:
        assert len(self.slots) == len(self.starts) >= 1
        many = len(self.slots) > 1 and self.num_tokens > 1
        assert not many or not any(self.starts), "multi-token rows: one sequence, or all from 0"
        assert self.lengths is None or len(self.lengths) == len(self.slots)
        self.span = max(self.starts) + self.num_tokens  # cache positions attention reads
        lo = self.slots[0]
        # contiguous slots are read as a view instead of a gather
        self.slot_range = (
            slice(lo, lo + len(self.slots))
            if self.slots == list(range(lo, lo + len(self.slots)))
            else None
        )
        self.slot_index = torch.tensor(self.slots)
        self.positions = torch.tensor(self.starts)[:, None] + torch.arange(self.num_tokens)
        padded = self.lengths is not None and min(self.lengths) < self.num_tokens
        self.causal = not any(self.starts) and not padded
        self.mask: torch.Tensor | None = None
        # one token per row at one position: every key of the span is visible, no mask
        every_key = self.num_tokens == 1 and len(set(self.starts)) == 1
        if not self.causal and not every_key:  # key j is visible to query t iff j <= position
            keys = torch.arange(self.span)
            self.mask = (keys[None, None, None, :] <= self.positions[:, None, :, None]).contiguous()
            if padded:  # and j is one of the row's own tokens, not padding
                real = keys[None, :] < torch.tensor(self.lengths)[:, None]
                self.mask &= real[:, None, None, :]
        self._flat_rows: dict[tuple[int, int], torch.Tensor] = {}  # by the cache's (heads, len)
        self._additive: dict[torch.dtype, torch.Tensor] = {}

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """`mask` as SDPA uses it (0 where visible, -inf where not, in `dtype`), made once per
        batch rather than by every layer's attention (two ops a layer and step)."""
        if self.mask is None:
            return None
        additive = self._additive.get(dtype)
        if additive is None:
            additive = torch.zeros(self.mask.shape, dtype=dtype)
            additive.masked_fill_(~self.mask, float("-inf"))
            self._additive[dtype] = additive
        return additive

    def write(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        if self.num_tokens == 1:  # one row per sequence: index_copy_ into the flat cache
            B, H, S, D = cache.shape
            rows = self._flat_rows.get((H, S))
            if rows is None:  # row of (slot, head, position) in the [B*H*S, D] view
                head = torch.arange(H)[None, :]
                starts = torch.tensor(self.starts)[:, None]
                rows = ((self.slot_index[:, None] * H + head) * S + starts).reshape(-1)
                self._flat_rows[(H, S)] = rows
            cache.view(B * H * S, D).index_copy_(0, rows, new[:, :, 0].reshape(-1, D))
        elif len(self.slots) == 1:
            s, p = self.slots[0], self.starts[0]
            cache[s, :, p : p + self.num_tokens] = new[0]
        elif self.slot_range is not None:
            cache[self.slot_range, :, : self.num_tokens] = new
        else:
            cache[self.slot_index, :, : self.num_tokens] = new

    def read(self, cache: torch.Tensor) -> torch.Tensor:
        if self.slot_range is not None:
            return cache[self.slot_range, :, : self.span]
        return cache[:, :, : self.span].index_select(0, self.slot_index)

    def last(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's hidden state at its last real token, ``[B, 1, hidden]``."""
        if self.lengths is None:
            return x[:, -1:]
        return x[torch.arange(len(self.slots)), torch.tensor(self.lengths) - 1][:, None]

    def attend_one(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Attention of one query per row (a decode step) over what `read` returned."""
        return decode_attention(q, keys, values, self.attention_mask(q.dtype))


@dataclass
class DecodeWindow(Batch):
    """A decode batch (one token per sequence) that reads cache slots ``0..rows-1`` as one view
    whatever slots its sequences hold: the shape a compiled decode step is traced for
    (`tdllm.model.compiled_decode`). Its Python state is two ints (`rows`, `span`) and tensors,
    so two graphs (one row; more, `covering`) serve every batch size, slot set and length;
    the queries are scattered into their slots' rows and the free slots' rows (a gap left by a
    finished request) attend to their stale key 0 and are dropped. The same arithmetic per row
    as `Batch`."""

    @classmethod
    def covering(cls, batch: Batch) -> DecodeWindow:
        """`batch` as a window, in one of the two shapes a compiled step is traced for: one
        row (a lone sequence in slot 0: a graph of its own, as dynamo specializes a size of 1;
        its GEMVs read the weights once, where two rows cost the int kernels nearly twice), or
        at least two rows and two sequences (one graph for every other batch: a lone sequence
        in a later slot is sent twice, the same token, slot and position, so the copy writes
        the same keys and values and its logits are dropped; the engine moves a sequence left
        alone to slot 0 before its next step, `Engine._move_lone_sequence_to_slot_0`)."""
        slots, starts = batch.slots, batch.starts
        if len(slots) == 1 and slots[0] > 0:
            slots, starts = slots * 2, starts * 2
        return cls(slots, starts, 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        assert self.num_tokens == 1 and self.lengths is None
        self.rows = max(self.slots) + 1
        self.row_positions = torch.zeros(self.rows, dtype=torch.long).index_copy_(
            0, self.slot_index, self.positions[:, 0]
        )
        keys = torch.arange(self.span)
        self.window_mask = (keys[None, :] <= self.row_positions[:, None])[:, None, None, :]

    def write(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        cache[self.slot_index, :, self.positions[:, 0]] = new[:, :, 0]

    def read(self, cache: torch.Tensor) -> torch.Tensor:
        return cache[: self.rows, :, : self.span]

    def attend_one(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        if self.rows == 1:
            # the lone sequence in slot 0: its query is the window's only row (no scatter, no
            # gather), and its span ends at its token, so every key is visible: SDPA without a
            # mask, ~4 us a call faster (the same result: the mask adds zeros)
            return decode_attention(q, keys, values, None)
        rows = q.new_zeros((self.rows, *q.shape[1:])).index_copy_(0, self.slot_index, q)
        y = decode_attention(rows, keys, values, self.window_mask)
        return y.index_select(0, self.slot_index)


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """One query per sequence (``q [B, heads, 1, d]``) over its cached keys and values
    (``[B, kv_heads, span, d]``). The query heads that share a key head become that head's query
    rows, so SDPA neither repeats the keys (`enable_gqa`) nor runs a one-row query block per
    head; same kernel, fp32 accumulation, same result."""
    B, H, _, D = q.shape
    kv = keys.shape[1]
    grouped = q.view(B, kv, H // kv, D)  # query head h reads key head h // (H // kv)
    y = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
    return y.view(B, H, 1, D)
