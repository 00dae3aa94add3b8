"""The `split` profile: the public prefix runs on an untrusted device, the private tail in the TD.

`offload_public_prefix` takes a loaded TD `Transformer` and places its embedding and blocks
``0..L-K-1`` on a device (via the one `Crossing`), after verifying every one of those tensors
against the pinned public reference. Blocks ``L-K..L-1``, the final norm and the untied
`lm_head` never leave TD memory. The model keeps its full set of weights: the TD copy of the
public prefix is what audits re-execute.
"""

from __future__ import annotations

import torch

from tdllm.model.checkpoint import Checkpoint
from tdllm.model.transformer import Batch, Transformer
from tdllm.trusted.audit import ReexecutionAudit
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.errors import DeviceIntegrityError
from tdllm.trusted.freivalds import FreivaldsCheck
from tdllm.trusted.public_reference import PublicReference


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
            hidden = self.crossing.run_prefix(tokens, batch.slots, batch.starts)
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
) -> OffloadedPrefix:
    """Verify the prefix tensors of `checkpoint` against `reference`, send them, attach."""
    num_layers = model.cfg.num_layers
    if not 1 <= k < num_layers:
        raise ValueError(f"K must be in [1, {num_layers - 1}] for a {num_layers}-layer model")
    names = set(prefix_names(num_layers - k))
    public = {n: t for n, t in checkpoint.tensors() if n in names}
    if set(public) != names:
        raise ValueError(f"checkpoint lacks prefix tensors {sorted(names - set(public))[:3]}")
    reference.verify(public)  # before a single byte is sent
    crossing.install_prefix(
        model.cfg,
        num_layers - k,
        public,
        max_batch,
        max_seq_len,
        model.dtype,
        keep_gemm_io=freivalds_rate > 0,
    )
    del public
    audit = (
        ReexecutionAudit(model, num_layers - k, audit_rate, max_batch, max_seq_len)
        if audit_rate > 0
        else None
    )
    freivalds = (
        FreivaldsCheck(prefix_projections(model, num_layers - k), freivalds_rate)
        if freivalds_rate > 0
        else None
    )
    placement = OffloadedPrefix(crossing, num_layers - k, audit, freivalds)
    model.prefix = placement
    return placement


def prefix_projections(model: Transformer, num_prefix_layers: int) -> dict[str, torch.Tensor]:
    """The TD's copies of the prefix's (fused) projection weights, under the device's names."""
    out: dict[str, torch.Tensor] = {}
    for i in range(num_prefix_layers):
        for part in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            linear = model.get_submodule(f"layers.{i}.{part}")
            out[f"model.layers.{i}.{part}.weight"] = linear.get_parameter("weight").detach()
    return out
