"""`split`: the public prefix (embedding + blocks ``0..L-K-1``) on an untrusted device, verified
against a pinned public reference first; the last K blocks, the final norm and the untied
`lm_head` in TD memory (trusted/split.py has the placement and its audits).

With ``quant`` the private part's projections (the last K blocks and the lm_head) keep their
weights int8/int4 in the TD, as td-only's would (`quant_table`); the public prefix stays in the
model's dtype: it is checked against the public reference tensor by tensor, and the TD's copy
of it only serves the audits (re-execution, Freivalds) of what the device computes."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from tdllm.errors import UsageError
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.config import ModelConfig
from tdllm.model.linear import LinearMethodTable, PlainCpuMethod
from tdllm.model.quantized import quant_table
from tdllm.model.transformer import PrefixPlacement, Transformer, prefix_names
from tdllm.profiles.base import ProfileBase
from tdllm.profiles.options import PINNED_REFERENCE
from tdllm.trusted.public_reference import PublicReference
from tdllm.trusted.split import OffloadedPrefix, offload_public_prefix


class Split(ProfileBase):
    name = "split"
    uses_device = True
    placement: OffloadedPrefix | None = None

    def source(self, checkpoint: Checkpoint) -> Checkpoint:
        cfg, k = checkpoint.config, self.options.k
        if not 1 <= k < cfg.num_layers:
            raise UsageError(f"--k must be in [1, {cfg.num_layers - 1}] for this model")
        if cfg.tie_word_embeddings:
            raise UsageError(
                "split needs an untied lm_head: a tied one is the public embedding table, so "
                "the model has no private head (untie it when preparing the private model)"
            )
        return read_once(checkpoint, k)

    def linear_methods(self, cfg: ModelConfig) -> LinearMethodTable:
        return split_methods(cfg, self.options.k, self.options.quant)

    def after_load(self, model: Transformer, checkpoint: Checkpoint) -> None:
        o = self.options
        reference = PublicReference.load(o.public_reference or PINNED_REFERENCE)
        self.placement = offload_public_prefix(
            model,
            checkpoint,
            reference,
            self.crossing,
            o.k,
            self.max_batch,
            self.max_seq_len,
            o.audit_rate,
            o.freivalds_rate,
            o.rounding,
        )

    def prefix_placement(self) -> PrefixPlacement | None:
        return self.placement


# a block's projections, by their names under ``model.layers.<i>.`` (`Transformer`'s modules)
BLOCK_PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def split_methods(cfg: ModelConfig, k: int, quant: str = "none") -> LinearMethodTable:
    """split's methods: plain everywhere without quant; with it, the last `k` blocks and the
    lm_head take td-only's methods for `quant` (by name: w8a8 keeps q|k|v weight-only) and the
    public prefix stays plain. Also the TD-only reference a split model equals bit for bit."""
    if quant == "none":
        return LinearMethodTable()
    quantized = quant_table(quant)
    private = [
        f"model.layers.{i}.{projection}"
        for i in range(cfg.num_layers - k, cfg.num_layers)
        for projection in BLOCK_PROJECTIONS
    ]
    rules = [(name, quantized.method_for(name)) for name in [*private, "lm_head"]]
    return LinearMethodTable(rules, PlainCpuMethod())


def read_once(checkpoint: Checkpoint, k: int) -> Checkpoint:
    """`checkpoint` streamed once for split: the first pass (the TD load) keeps the public
    prefix tensors, the second (the offload) hands them over and lets them go. A sealed
    checkpoint can only stream once, and no source is read twice."""
    names = set(prefix_names(checkpoint.config.num_layers - k))
    kept: dict[str, torch.Tensor] = {}
    passes = [0]

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        passes[0] += 1
        if passes[0] == 1:
            for name, tensor in checkpoint.tensors():
                if name in names:
                    kept[name] = tensor
                yield name, tensor
        else:
            while kept:
                yield kept.popitem()

    return dataclasses.replace(checkpoint, tensors=tensors, tensors_into=None)
