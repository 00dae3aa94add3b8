"""`masked`: every block projection's public-base product runs one-time-padded on an untrusted
device; the TD keeps the secret delta, attention, norms, RoPE, SwiGLU, the embedding and the
lm_head (trusted/masked_linear.py has the scheme).

Each block projection gets a `MaskedLinearMethod` that loads MODEL's weight and, in
`after_load`, installs it against BASE: BASE's weight quantized to int8 goes to the device
(public), ``MODEL - BASE`` stays in the TD (dense, or its rank-r SVD with the residual reported).
With ``crossing=None`` the same build is the TD-only reference with the same quantization, the
path the masked one must match bit for bit.

With ``quant`` the TD's own weights take td-only's methods for it (`quant_table`, by name): a
dense delta, and the lm_head. The device's product is unchanged (the scheme's public int8).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tdllm.errors import UsageError
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.config import ModelConfig
from tdllm.model.linear import Linear, LinearMethod, LinearMethodTable
from tdllm.model.loader import load_model
from tdllm.model.quantized import quant_table
from tdllm.model.transformer import Transformer
from tdllm.profiles.base import IdleWork, ProfileBase
from tdllm.profiles.options import PINNED_REFERENCE
from tdllm.sources import open_checkpoint
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.masked_linear import BaseWeights, MaskedLinearMethod, MaskedReport
from tdllm.trusted.public_reference import PublicReference

MASKED_LAYERS = "model.layers.*"  # every block projection; lm_head and embedding stay in the TD
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class Masked(ProfileBase):
    name = "masked"
    uses_device = True
    method: MaskedLinearMethod | None = None

    def linear_methods(self, cfg: ModelConfig) -> LinearMethodTable:
        o = self.options
        base = (
            o.masked_base
            if isinstance(o.masked_base, Checkpoint)
            else open_checkpoint(o.masked_base)
        )
        check_same_shape(cfg, base.config)
        # BASE's int8 weights cross only if BASE is the pinned public checkpoint: a BASE path
        # pointing at the private model would otherwise put MODEL on the device
        reference = PublicReference.load(o.public_reference or PINNED_REFERENCE)
        self.method = masked_method(base, self.crossing, o.masked_rank, reference, o.quant)
        return masked_methods(self.method)

    def after_load(self, model: Transformer, checkpoint: Checkpoint) -> None:
        if self.method is not None:
            self.method.base = None  # every layer took its BASE weight

    def idle_work(self) -> IdleWork | None:
        return None if self.method is None else self.method.precompute_pads


def build_masked(
    checkpoint: Checkpoint,
    base: Checkpoint,
    dtype: torch.dtype,
    crossing: Crossing | None,
    rank: int | None = None,
    check_rate: float = 1.0,
    reference: PublicReference | None = None,
    quant: str = "none",
) -> tuple[Transformer, MaskedLinearMethod]:
    """MODEL `checkpoint` with masked projections over `crossing` (None: the TD reference
    path), outside a served profile: `tdllm prepare`, fidelity and equivalence measurements,
    attacks. `reference` None: the caller declares BASE public as it is (lab use only; the
    served profile checks BASE against the pinned reference)."""
    check_same_shape(checkpoint.config, base.config)
    method = masked_method(base, crossing, rank, reference, quant, check_rate)
    model, _ = load_model(checkpoint, dtype, masked_methods(method))
    method.base = None
    return model, method


def masked_method(
    base: Checkpoint,
    crossing: Crossing | None,
    rank: int | None,
    reference: PublicReference | None,
    quant: str = "none",
    check_rate: float = 1.0,
) -> MaskedLinearMethod:
    if rank is not None and rank < 1:
        raise UsageError("masked: the delta rank must be at least 1")
    weights, tensors = base_weights(base)
    if reference is None:
        reference = PublicReference.build(base.name, tensors.items())
    elif crossing is not None:  # all of BASE checked before a single byte is sent
        reference.verify(tensors)
    delta_methods = None if quant == "none" else quant_table(quant)
    return MaskedLinearMethod(crossing, check_rate, weights, rank, reference, delta_methods)


def masked_methods(method: MaskedLinearMethod) -> LinearMethodTable:
    """Every block projection masked; the lm_head plain, or on the quant's method for it (from
    the table the method keeps its deltas with)."""
    rules: list[tuple[str, LinearMethod]] = [(MASKED_LAYERS, method)]
    if method.delta_methods is not None:
        rules.append(("lm_head", method.delta_methods.method_for("lm_head")))
    return LinearMethodTable(rules)


def check_same_shape(cfg: ModelConfig, base_cfg: ModelConfig) -> None:
    shape = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size)
    if shape != (base_cfg.num_layers, base_cfg.hidden_size, base_cfg.intermediate_size):
        raise UsageError("masked: MODEL and BASE have different shapes")


def base_weights(base: Checkpoint) -> tuple[BaseWeights, dict[str, torch.Tensor]]:
    """BASE's block weights, read once, each handed to its layer (the checkpoint tensors it is
    fused from) and let go, so BASE is never held twice; and the tensors themselves."""
    tensors = {n: t for n, t in base.tensors() if n.startswith("model.layers.")}

    def parts_for(linear: Linear) -> dict[str, torch.Tensor]:
        return {name: tensors.pop(name) for name in checkpoint_names(linear.name)}

    return parts_for, tensors


def checkpoint_names(layer: str) -> list[str]:
    """The checkpoint tensors a (fused) projection is made of."""
    prefix, _, leaf = layer.rpartition(".")
    return [f"{prefix}.{p}.weight" for p in FUSED.get(leaf, (leaf,))]


def fused_base_weight(base: Mapping[str, torch.Tensor], layer: str) -> torch.Tensor:
    """BASE's weight for projection `layer` in its (fused) layout, fp32."""
    return torch.cat([base[n].float() for n in checkpoint_names(layer)])


def masked_linears(model: Transformer) -> list[Linear]:
    return [
        m
        for m in model.modules()
        if isinstance(m, Linear) and isinstance(m.method, MaskedLinearMethod)
    ]


__all__ = ["MaskedReport", "build_masked", "masked_linears"]
