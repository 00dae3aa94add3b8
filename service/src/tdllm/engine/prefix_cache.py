"""Prefix caching: the keys and values of prompts' leading blocks, kept after their prefill so a
later prompt that starts with the same tokens (a shared system prompt) copies them into its slot
and prefills only the rest, as a continuation.

A block is `block` consecutive prompt tokens at a block-aligned position. A block's key hashes
its parent's key and its own token ids (a hash chain), so it names the whole prefix up to its
end: two prompts share a block's entry only if they agree on every token before it, and a prompt
diverging mid-block reuses only the whole blocks before that block. Entries live in tensors of
their own (`[blocks, kv_heads, block, head_dim]` per layer), never in the slots, and are evicted
least recently used. A lookup or store touches a chain's blocks from its end to its root, so a
parent is always more recent than its children and eviction takes leaves first: no block stays
cached after its parent is gone (it could never be reached again).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence

import torch

from tdllm.errors import UsageError
from tdllm.model.config import ModelConfig
from tdllm.model.transformer import KVCache
from tdllm.zero_pages import lazy_zeros

# tokens per block. Smaller blocks reuse more of a prompt diverging mid-block but hash and copy
# more pieces; 64 is a system prompt's granularity and a long enough row for a copy to be a
# few contiguous memcpys per layer (vLLM's CPU backend uses blocks of this order, 16..128)
PREFIX_BLOCK = 64


def check_prefix_cache(blocks: int, block: int = PREFIX_BLOCK) -> None:
    if blocks < 0 or block < 1:
        raise UsageError(
            f"prefix_cache_blocks is {blocks} (block {block}); it must be 0 (off) or a "
            "block count, and the block at least 1 token"
        )


class PrefixCache:
    """At most `blocks` blocks of `block` tokens of keys and values, by their prefix's hash."""

    def __init__(
        self, cfg: ModelConfig, blocks: int, block: int, dtype: torch.dtype = torch.float32
    ) -> None:
        check_prefix_cache(blocks, block)
        shape = (blocks, cfg.num_kv_heads, block, cfg.head_dim)
        # memory only for the blocks kept (pages on demand, as the KV cache's slots)
        cpu = torch.device("cpu")
        self.k = [lazy_zeros(shape, dtype, cpu) for _ in range(cfg.num_layers)]
        self.v = [lazy_zeros(shape, dtype, cpu) for _ in range(cfg.num_layers)]
        self.block = block
        self.capacity = blocks
        self._entries: OrderedDict[bytes, int] = OrderedDict()  # key -> row, oldest first
        self._free = list(range(blocks))
        self.hit_tokens = 0  # prompt tokens served from the cache, all lookups together

    def __len__(self) -> int:
        return len(self._entries)

    def _keys(self, prompt: Sequence[int], count: int, scope: bytes) -> list[bytes]:
        """The chain keys of the first `count` blocks of `prompt` in `scope` (the chain's root:
        another scope's identical prompt has other keys)."""
        keys: list[bytes] = []
        parent = hashlib.sha256(b"tdllm prefix scope\0" + scope).digest() if scope else b""
        for i in range(count):
            ids = prompt[i * self.block : (i + 1) * self.block]
            parent = hashlib.sha256(parent + struct.pack(f"<{len(ids)}q", *ids)).digest()
            keys.append(parent)
        return keys

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # the root last: the most recent, evicted after its children
            self._entries.move_to_end(key)

    def lookup(self, prompt: Sequence[int], cache: KVCache, slot: int, scope: bytes = b"") -> int:
        """Copy the longest cached block-aligned prefix of `prompt` (kept in `scope`) into
        `slot`, leaving at least one token to prefill (the first token's logits come from a real
        pass); its length."""
        keys = self._keys(prompt, (len(prompt) - 1) // self.block, scope)
        hit = 0
        while hit < len(keys) and keys[hit] in self._entries:
            hit += 1
        if not hit:
            return 0
        self._touch(keys[:hit])
        rows = torch.tensor([self._entries[key] for key in keys[:hit]])
        length = hit * self.block
        for pool, layer in zip((*self.k, *self.v), (*cache.k, *cache.v), strict=True):
            # [blocks, heads, block, dim] -> [heads, blocks * block, dim]
            layer[slot, :, :length] = pool[rows].transpose(0, 1).flatten(1, 2)
        self.hit_tokens += length
        return length

    def store(self, prompt: Sequence[int], cache: KVCache, slot: int, scope: bytes = b"") -> None:
        """Keep the whole leading blocks of `prompt`, prefilled in `slot`, in `scope`, as far as
        the budget holds them; blocks already kept are only touched."""
        keys = self._keys(prompt, min(len(prompt) // self.block, self.capacity), scope)
        if not keys:
            return
        # the chain's kept blocks become the most recent first, so making room below evicts
        # other prompts' blocks only (the chain fits: it is at most `capacity` long)
        self._touch([key for key in keys if key in self._entries])
        new: list[tuple[int, int]] = []  # (block of the prompt, row)
        for i, key in enumerate(keys):
            if key in self._entries:
                continue
            row = self._free.pop() if self._free else self._entries.popitem(last=False)[1]
            self._entries[key] = row
            new.append((i, row))
        self._touch(keys)
        if not new:
            return
        blocks = torch.tensor([i for i, _ in new])
        rows = torch.tensor([row for _, row in new])
        end = len(keys) * self.block
        for pool, layer in zip((*self.k, *self.v), (*cache.k, *cache.v), strict=True):
            # [heads, end, dim] -> [blocks, heads, block, dim]
            kept = layer[slot, :, :end].unflatten(1, (len(keys), self.block)).transpose(0, 1)
            pool[rows] = kept[blocks]
