"""A Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or untied lm_head.

Read top to bottom: `Transformer`, `Block`, `Attention`, `FeedForward`; the norm is
`tdllm.model.rms_norm`, the rotary embedding `tdllm.model.rotary`, and where rows sit in the KV
cache (`KVCache`, `Batch`, `DecodeWindow`) is `tdllm.model.cache_layout`; a block whose
projections all run on our AVX2 kernels takes a decode step in one op
(`tdllm.model.one_call_block`). Module and parameter names follow the Hugging Face Llama layout
(``model.layers.N.self_attn...``) so checkpoints map one to one, except that q/k/v and gate/up
are fused (`STACKED`) to halve the number of matmuls per block.

No projection here is an `nn.Linear`: each is a `Linear` that asks the `LinearMethodTable` for its
strategy by full name.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tdllm.freed_heap import return_freed_heap
from tdllm.model import one_call_block
from tdllm.model.block_embedding import BlockEmbedding
from tdllm.model.cache_layout import Batch as Batch
from tdllm.model.cache_layout import DecodeWindow
from tdllm.model.cache_layout import KVCache as KVCache
from tdllm.model.config import ModelConfig
from tdllm.model.gguf_blocks import GgufQuantized, TakesGgufBlocks
from tdllm.model.head_embedding import HeadEmbedding, embedding_from_head
from tdllm.model.linear import (
    Linear,
    LinearMethodTable,
    PlainCpuMethod,
    TdCpuKernels,
    copy_unless_same,
)
from tdllm.model.rms_norm import RMSNorm
from tdllm.model.rotary import rope_tables, rotate, signed_sin

# checkpoint projection -> (fused projection, shard index); see Transformer.load_weights
STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def prefix_names(num_prefix_layers: int) -> list[str]:
    """Checkpoint names of the embedding and blocks ``0..num_prefix_layers-1``."""
    parts = (
        "input_layernorm",
        "post_attention_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    names = ["model.embed_tokens.weight"]
    for i in range(num_prefix_layers):
        names += [f"model.layers.{i}.{p}.weight" for p in parts]
    return names


class PrefixPlacement(Protocol):
    """Who computes the embedding and blocks ``0..num_layers-1`` when not this model.

    The model only needs the hidden states entering block `num_layers`; where they come from
    (and how they are checked) is the placement's business, so this file knows no trust boundary.
    """

    num_layers: int

    def __call__(self, tokens: torch.Tensor, batch: Batch) -> torch.Tensor: ...


class TailStep(Protocol):
    """`Transformer.tail` as a compiled step: logits from the hidden states entering `start`."""

    def __call__(
        self, x: torch.Tensor, batch: Batch, cache: KVCache, start: int
    ) -> torch.Tensor: ...


class AttentionCore(Protocol):
    """Attention before o_proj (``[B, T, heads*head_dim]``) for one layer, computed by a profile.

    It writes this layer's `k_cache`/`v_cache` as it needs; the model only applies o_proj.
    """

    def __call__(
        self, x: torch.Tensor, batch: Batch, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor: ...


class Transformer(nn.Module):
    rope_cos: torch.Tensor
    rope_signed_sin: torch.Tensor

    def __init__(
        self,
        cfg: ModelConfig,
        methods: LinearMethodTable | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        methods = methods or LinearMethodTable()
        self.cfg = cfg
        self.dtype = dtype
        # uninitialised (the checkpoint fills it): a random init took 1.4 s at a 128k vocabulary
        table = torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens: nn.Embedding | BlockEmbedding | HeadEmbedding = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=table
        )
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(cfg, i, methods, dtype) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = Linear(
            "lm_head", cfg.hidden_size, cfg.vocab_size, methods.method_for("lm_head"), dtype
        )
        cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos.to(dtype), persistent=False)
        # sin with its first half negated: `rotate` needs no negation per step (`apply_rope`)
        self.register_buffer("rope_signed_sin", signed_sin(sin).to(dtype), persistent=False)
        # None: every block runs here. Otherwise the first `prefix.num_layers` blocks (and the
        # embedding) are computed by `prefix`, e.g. a public prefix on an untrusted device.
        self.prefix: PrefixPlacement | None = None
        # `tail` compiled for decode steps (`tdllm.model.compiled_decode`); None: eager
        self.decode_step: TailStep | None = None

    def forward(
        self, tokens: torch.Tensor, batch: Batch, cache: KVCache, last_only: bool = True
    ) -> torch.Tensor:
        """Logits ``[B, T or 1, vocab]`` for `tokens` ``[B, T]`` placed as `batch` says."""
        if self.prefix is None:
            x, start = self.embed_tokens(tokens), 0
        else:  # the first blocks run elsewhere (see `PrefixPlacement`); the rest run here
            x, start = self.prefix(tokens, batch), self.prefix.num_layers
        # a one-token prompt (position 0) is a prefill: eager, not a second graph for span 1
        if self.decode_step is not None and batch.num_tokens == 1 and min(batch.starts) > 0:
            window = DecodeWindow.covering(batch)
            rows = len(window.slots)
            x = x if rows == x.shape[0] else x.expand(rows, -1, -1).contiguous()
            return self.decode_step(x, window, cache, start)[: len(batch.slots)]
        return self.tail(x, batch, cache, start, last_only)

    def tail(
        self, x: torch.Tensor, batch: Batch, cache: KVCache, start: int, last_only: bool = True
    ) -> torch.Tensor:
        """Logits from the hidden states `x` entering block `start`: the blocks, norm and head
        that run in this process, the part a compiled decode step replaces."""
        x = self.forward_blocks(x, batch, cache, start, len(self.layers))
        if last_only:
            x = batch.last(x)
        return self.lm_head(self.norm(x))

    def after_load(self) -> None:
        """Every weight is in: each projection's method finishes its own (`LinearMethod`)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.method.after_load(module)
        for block in self.layers:
            if isinstance(block, Block):
                attn, mlp = block.self_attn, block.mlp
                block.one_call = one_call_block.for_block(
                    (block.input_layernorm, block.post_attention_layernorm),
                    (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj),
                    attn.n_heads,
                    attn.n_kv,
                    mlp.inter,
                )

    def decodes_in_one_call(self) -> bool:
        """Whether every block run here (after a profile's prefix) takes its decode step in one
        op (`one_call_block`): then a compiled decode step has nothing left to gain (its graphs
        run the eager blocks, 0.72-0.81x that on the AVX2 EPYC: docs/performance.md, "One call
        a block")."""
        start = self.prefix.num_layers if self.prefix is not None else 0
        blocks = list(self.layers)[start:]
        return bool(blocks) and all(
            isinstance(b, Block) and b.one_call is not None and b.self_attn.core is None
            for b in blocks
        )

    def place(
        self,
        prefix: PrefixPlacement | None,
        core_for: Callable[[int], AttentionCore | None] = lambda _layer: None,
    ) -> None:
        """Let a profile compute the prefix (`PrefixPlacement`) and the attention of layer i
        (`core_for(i)`); blocks the prefix replaced hold no attention to place. Not once a
        decode step is compiled: its graph would go on running what it traced."""
        if self.decode_step is not None:
            raise RuntimeError("the decode step is compiled: place the model before compiling")
        self.prefix = prefix
        for i, block in enumerate(self.layers):
            if isinstance(block, Block):
                block.self_attn.core = core_for(i)

    def prefills_together(self) -> bool:
        """Whether several prompts may share one padded prefill (`Batch.lengths`): only when
        every block runs here on TD CPU kernels (plain or weight-only quantized,
        `TdCpuKernels`); a profile's prefix placement, attention core or other linear method
        sees one prompt at a time."""
        if self.prefix is not None:  # (its blocks may be placeholders here)
            return False
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        attention = [m for m in self.modules() if isinstance(m, Attention)]
        return all(isinstance(m.method, TdCpuKernels) for m in linears) and all(
            a.core is None for a in attention
        )

    def forward_blocks(
        self, x: torch.Tensor, batch: Batch, cache: KVCache, start: int, end: int
    ) -> torch.Tensor:
        """Hidden states after blocks ``start..end-1`` for hidden states `x` entering `start`.

        `cache` holds at least the layers run; a cache made for fewer layers (an audit's) is
        indexed from `start`'s own layer when it has exactly ``end - start`` of them.
        """
        cos = self.rope_cos[batch.positions][:, :, None]  # [B, T, 1, head_dim]
        signed = self.rope_signed_sin[batch.positions][:, :, None]
        offset = start if len(cache.k) == end - start else 0
        for i in range(start, end):
            x = self.layers[i](x, batch, cos, signed, cache.k[i - offset], cache.v[i - offset])
        return x

    def takes_blocks(self) -> bool:
        """Whether a projection's method takes GGUF blocks as they are (`TakesGgufBlocks`)."""
        return any(
            isinstance(m, Linear) and isinstance(m.method, TakesGgufBlocks) for m in self.modules()
        )

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor | GgufQuantized]]) -> None:
        """Copy Hugging Face-named checkpoint tensors in, one at a time, checking coverage.

        A tensor may come as GGUF blocks (`GgufQuantized`, `takes_blocks`): a projection whose
        method takes them gets them as they are, anything else gets them dequantized. A tied
        lm_head whose method takes blocks is made from the embedding's blocks."""
        linears = {m.name: m for m in self.modules() if isinstance(m, Linear)}
        # checkpoint name of every non-projection parameter ("model." + our attribute path)
        params = {
            f"model.{n}": p
            for n, p in self.named_parameters()
            if not n.endswith("_proj.weight") and not n.startswith("lm_head.")
        }
        expected = set(params)
        for name in linears:
            if name.endswith(("qkv_proj", "gate_up_proj")):
                parts = (
                    ("q_proj", "k_proj", "v_proj") if "qkv" in name else ("gate_proj", "up_proj")
                )
                prefix = name.rsplit(".", 1)[0]
                expected.update(f"{prefix}.{p}.weight" for p in parts)
            else:
                expected.add(f"{name}.weight")
        if self.cfg.tie_word_embeddings:
            expected.discard("lm_head.weight")
        seen: set[str] = set()
        embedding_blocks: GgufQuantized | None = None
        head_made = False
        for ckpt_name, tensor in tensors:
            if ckpt_name in seen or ckpt_name not in expected:
                why = "twice" if ckpt_name in seen else "but the model has no such weight"
                raise ValueError(f"checkpoint tensor {ckpt_name} given {why}")
            seen.add(ckpt_name)
            if ckpt_name == "model.embed_tokens.weight" and isinstance(tensor, GgufQuantized):
                if self.cfg.tie_word_embeddings:  # the table held once where the head can
                    read = embedding_from_head(self.lm_head, tensor, self.dtype)
                    if read is not None:
                        self.embed_tokens, head_made = read, True
                        continue
                embedding_blocks = tensor
                if self._embedding_stays_blocks():
                    self.embed_tokens = BlockEmbedding(tensor, self.dtype)
                    # a tied head reads the copy, not the file's pages again (0.28 GB at 1B)
                    embedding_blocks = self.embed_tokens.as_gguf()
                    continue
            self._load_one(ckpt_name, tensor, linears, params)
        missing = sorted(expected - seen)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        if self.cfg.tie_word_embeddings and not head_made:
            # the layers' freed staging back to the kernel before the head's, the load's peak
            return_freed_heap()
            self._tie_lm_head(embedding_blocks)

    def _embedding_stays_blocks(self) -> bool:
        """Whether the embedding may stay GGUF blocks (`BlockEmbedding`): nothing else reads a
        float table of it, i.e. the head is untied or takes the blocks itself (a quantized
        method; the plain ones share the table)."""
        return not self.cfg.tie_word_embeddings or isinstance(self.lm_head.method, TakesGgufBlocks)

    def weight_destinations(self) -> dict[str, torch.Tensor]:
        """Checkpoint name -> the model memory that tensor is copied into, for every weight held
        in plain TD storage (a reader may decrypt straight into it); others are absent."""
        out: dict[str, torch.Tensor] = {}
        for module in self.modules():
            if not isinstance(module, Linear) or not isinstance(module.method, PlainCpuMethod):
                continue
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            weight = weight.data
            prefix, _, fused = module.name.rpartition(".")
            shards = [(leaf, i) for leaf, (into, i) in STACKED.items() if into == fused]
            if not shards:
                out[f"{module.name}.weight"] = weight
                continue
            offsets = [0, *itertools.accumulate(module.shard_sizes)]
            for leaf, index in shards:
                out[f"{prefix}.{leaf}.weight"] = weight[offsets[index] : offsets[index + 1]]
        for name, param in self.named_parameters():
            if not name.endswith("_proj.weight") and not name.startswith("lm_head."):
                out[f"model.{name}"] = param.data
        return out

    def _load_one(
        self,
        ckpt_name: str,
        tensor: torch.Tensor | GgufQuantized,
        linears: dict[str, Linear],
        params: dict[str, nn.Parameter],
    ) -> None:
        module_name = ckpt_name.removesuffix(".weight")
        prefix, _, leaf = module_name.rpartition(".")
        shape = tuple(tensor.shape)
        if leaf in STACKED:
            fused, shard = STACKED[leaf]
            linear = linears[f"{prefix}.{fused}"]
            sizes = linear.shard_sizes
            offset = sum(sizes[:shard])
            if shape != (sizes[shard], linear.in_features):
                raise ValueError(f"{ckpt_name} has shape {shape}")
            _load_rows(linear, tensor, offset)
        elif module_name in linears:
            linear = linears[module_name]
            if isinstance(tensor, GgufQuantized):
                if shape != (linear.out_features, linear.in_features):
                    raise ValueError(f"{ckpt_name} has shape {shape}")
                _load_rows(linear, tensor, 0)
            else:
                linear.load_weight(tensor)
        else:
            param = params[ckpt_name]
            if tuple(param.shape) != shape:
                raise ValueError(f"{ckpt_name} has shape {shape}")
            if isinstance(tensor, GgufQuantized):
                tensor = tensor.dequantize()
            copy_unless_same(param.data, tensor)

    def _tie_lm_head(self, embedding_blocks: GgufQuantized | None = None) -> None:
        if isinstance(self.lm_head.method, PlainCpuMethod):  # share, do not copy
            self.lm_head.weight = self.float_embedding().weight
            self.lm_head.shared_weight = True
        elif embedding_blocks is not None and isinstance(self.lm_head.method, TakesGgufBlocks):
            self.lm_head.method.load_blocks(self.lm_head, embedding_blocks)  # not via the float
        else:
            self.lm_head.load_weight(self.float_embedding().weight.data)

    def float_embedding(self) -> nn.Embedding:
        """The embedding as a float table, for code that reads or replaces the table itself; a
        quantized load may keep it as GGUF blocks instead (`BlockEmbedding`) or read it from the
        tied head (`HeadEmbedding`), which is refused."""
        if not isinstance(self.embed_tokens, nn.Embedding):
            raise TypeError("the embedding is GGUF blocks or the tied head's rows, not a table")
        return self.embed_tokens


def _load_rows(linear: Linear, tensor: torch.Tensor | GgufQuantized, row_offset: int) -> None:
    """Rows ``row_offset:`` of `linear`: GGUF blocks as they are to a method that takes them,
    dequantized (this tensor only) to any other."""
    if isinstance(tensor, GgufQuantized):
        if isinstance(linear.method, TakesGgufBlocks):
            linear.method.load_blocks(linear, tensor, row_offset)
            return
        tensor = tensor.dequantize()
    linear.method.load_weight(linear, tensor, row_offset)


class Block(nn.Module):
    def __init__(
        self, cfg: ModelConfig, index: int, methods: LinearMethodTable, dtype: torch.dtype
    ) -> None:
        super().__init__()
        prefix = f"model.layers.{index}"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, f"{prefix}.self_attn", methods, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = FeedForward(cfg, f"{prefix}.mlp", methods, dtype)
        # a decode step in one op where every projection runs on our AVX2 kernels (set once
        # the weights are in: `Transformer.after_load`)
        self.one_call: one_call_block.OneCallBlock | None = None

    def forward(
        self,
        x: torch.Tensor,
        batch: Batch,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        if self.one_call is not None and self.self_attn.core is None and self.one_call.takes(x):
            return self.one_call(x, batch, cos, signed_sin, k_cache, v_cache)
        x = x + self.self_attn(self.input_layernorm(x), batch, cos, signed_sin, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def fused_linear(
    name: str, in_features: int, shards: list[int], methods: LinearMethodTable, dtype: torch.dtype
) -> Linear:
    return Linear(name, in_features, sum(shards), methods.method_for(name), dtype, shards)


class Attention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, prefix: str, methods: LinearMethodTable, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = fused_linear(
            f"{prefix}.qkv_proj", cfg.hidden_size, self.sizes, methods, dtype
        )
        self.o_proj = Linear(
            f"{prefix}.o_proj",
            q_size,
            cfg.hidden_size,
            methods.method_for(f"{prefix}.o_proj"),
            dtype,
        )
        # None: q/k/v, RoPE and attention run here. A profile may install its own core for
        # them (`obfuscated`: padded scores from a device); o_proj stays this module's.
        self.core: AttentionCore | None = None

    def forward(
        self,
        x: torch.Tensor,
        batch: Batch,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        if self.core is not None:
            return self.o_proj(self.core(x, batch, k_cache, v_cache))
        B, T, _ = x.shape
        heads = self.qkv_proj(x).view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim)
        rotated = self.n_heads + self.n_kv  # q and k, rotated in one pass
        qk = rotate(heads[:, :, :rotated], cos, signed_sin).transpose(1, 2)
        q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]
        v = heads[:, :, rotated:].transpose(1, 2)
        batch.write(k_cache, k)
        batch.write(v_cache, v)
        keys, values = batch.read(k_cache), batch.read(v_cache)
        if T == 1:
            y = batch.attend_one(q, keys, values)
        else:
            y = F.scaled_dot_product_attention(
                q,
                keys,
                values,
                attn_mask=batch.attention_mask(q.dtype),
                is_causal=batch.causal,
                enable_gqa=self.n_heads != self.n_kv,
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(
        self, cfg: ModelConfig, prefix: str, methods: LinearMethodTable, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = fused_linear(
            f"{prefix}.gate_up_proj", cfg.hidden_size, [self.inter, self.inter], methods, dtype
        )
        self.down_proj = Linear(
            f"{prefix}.down_proj",
            self.inter,
            cfg.hidden_size,
            methods.method_for(f"{prefix}.down_proj"),
            dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)
