"""The `split` profile: the public prefix runs on an untrusted device, the private tail in the TD.

`offload_public_prefix` takes a loaded TD `Transformer` and places its embedding and blocks
``0..L-K-1`` on a device (via the one `Crossing`), after verifying every one of those tensors
against the pinned public reference. Blocks ``L-K..L-1``, the final norm and the untied
`lm_head` never leave TD memory. The TD keeps its own copy of the public prefix only while a
check needs it (re-execution audits run it, Freivalds reads its projection weights); with both
off, `release_public_prefix` drops it, so the TD holds just the tail, final norm and lm_head.
"""

from __future__ import annotations

import torch
from torch import nn

from tdllm.freed_heap import return_freed_heap
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.transformer import Batch, Transformer, prefix_names
from tdllm.trusted import publishable
from tdllm.trusted.audit import ReexecutionAudit
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.device_rounding import DeviceRounding, rounding_of
from tdllm.trusted.errors import DeviceIntegrityError
from tdllm.trusted.freivalds import FreivaldsCheck
from tdllm.trusted.public_reference import PublicReference
from tdllm.trusted.publishable import token_ids


class OffloadedPrefix:
    """The model's `PrefixPlacement` for `split`: hidden states from the device, audited."""

    def __init__(
        self,
        crossing: Crossing,
        num_layers: int,
        audit: ReexecutionAudit | None,
        freivalds: FreivaldsCheck | None = None,
    ) -> None:
        self.crossing, self.num_layers, self.audit = crossing, num_layers, audit
        self.freivalds = freivalds
        self.failure: DeviceIntegrityError | None = None

    def __call__(self, tokens: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self.failure is not None:  # once caught lying, the device is never used again
            raise DeviceIntegrityError(
                f"serving stopped after an integrity failure: {self.failure}"
            )
        try:
            hidden = self.crossing.run_prefix(token_ids(tokens), batch.slots, batch.starts)
            if self.audit is not None:
                self.audit.check(tokens, batch, hidden)
            if self.freivalds is not None:
                names = self.freivalds.sample()
                if names:
                    self.freivalds.check(self.crossing.gemm_io(names), names)
        except DeviceIntegrityError as exc:
            self.failure = exc
            raise
        return hidden


def offload_public_prefix(
    model: Transformer,
    checkpoint: Checkpoint,
    reference: PublicReference,
    crossing: Crossing,
    k: int,
    max_batch: int,
    max_seq_len: int,
    audit_rate: float,
    freivalds_rate: float = 0.0,
    rounding: DeviceRounding | None = None,
) -> OffloadedPrefix:
    """Verify the prefix tensors of `checkpoint` against `reference` and send them; the
    placement that computes the prefix from then on (`Transformer.place` takes it). Its checks
    allow the device kind's measured `rounding` (device_rounding.py) unless one is given."""
    num_layers = model.cfg.num_layers
    if not 1 <= k < num_layers:
        raise ValueError(f"K must be in [1, {num_layers - 1}] for a {num_layers}-layer model")
    names = set(prefix_names(num_layers - k))
    public = {n: t for n, t in checkpoint.tensors() if n in names}
    if set(public) != names:
        raise ValueError(f"checkpoint lacks prefix tensors {sorted(names - set(public))[:3]}")
    sendable = publishable.public(public, reference)  # before a single byte is sent
    crossing.install_prefix(
        model.cfg,
        num_layers - k,
        sendable,
        max_batch,
        max_seq_len,
        model.dtype,
        keep_gemm_io=freivalds_rate > 0,
    )
    del public, sendable
    rounding = rounding or rounding_of(crossing.kind)
    audit = (
        ReexecutionAudit(
            model,
            num_layers - k,
            audit_rate,
            max_batch,
            max_seq_len,
            rounding.audit_tolerance_for(model.dtype),
            rounding.exact_replay,
        )
        if audit_rate > 0
        else None
    )
    freivalds = (
        FreivaldsCheck(
            prefix_projections(model, num_layers - k), freivalds_rate, rounding.freivalds_factor
        )
        if freivalds_rate > 0
        else None
    )
    placement = OffloadedPrefix(crossing, num_layers - k, audit, freivalds)
    if audit is None and freivalds is None:
        release_public_prefix(model, num_layers - k)
    return placement


def release_public_prefix(model: Transformer, num_prefix_layers: int) -> int:
    """Free the TD's copies of the embedding and blocks ``0..num_prefix_layers-1``; bytes freed.

    Nothing in the TD reads them once the device computes the prefix and no check re-executes
    it: `Transformer.forward` starts its own blocks at ``prefix.num_layers``, and the untied
    lm_head does not share the embedding's storage. The blocks become empty placeholders so
    layer indices stay as they are.
    """
    freed = 0
    for i in range(num_prefix_layers):
        block = model.layers[i]
        freed += sum(p.numel() * p.element_size() for p in block.parameters())
        model.layers[i] = nn.Identity()
    embed = model.float_embedding()
    freed += embed.weight.numel() * embed.weight.element_size()
    empty = torch.empty(0, model.cfg.hidden_size, dtype=model.dtype)
    embed.weight = nn.Parameter(empty, requires_grad=False)
    return_freed_heap()
    return freed


def prefix_projections(model: Transformer, num_prefix_layers: int) -> dict[str, torch.Tensor]:
    """The TD's copies of the prefix's (fused) projection weights, under the device's names."""
    out: dict[str, torch.Tensor] = {}
    for i in range(num_prefix_layers):
        for part in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            linear = model.get_submodule(f"layers.{i}.{part}")
            out[f"model.layers.{i}.{part}.weight"] = linear.get_parameter("weight").detach()
    return out
