"""`MaskedLinearMethod`: a projection whose public-base product runs masked on a device.

For ``y = x @ W.T`` with ``W = W0 + D`` (W0 the public base weight, D the secret delta):

1. the TD quantizes ``x`` to fixed point (`masked_ring.quantize_activation`), adds a fresh
   one-time pad ``r`` (`pads.PadPool`) and sends only ``x~ = x_q + r mod 2^32``;
2. the device returns ``x~ @ W0_q.T`` over Z (`untrusted/masked_ops.gemm_ring`), W0_q being
   the int8 quantization of the PUBLIC base weight, the only weight it ever holds;
3. the TD checks it (`modular_freivalds`, every call), unmasks ``y_q = y~ - r @ W0_q.T mod
   2^32`` (exact: ``|x_q @ W0_q.T| < 2^31``), dequantizes, and adds the delta ``x @ D.T`` itself
   (dense fp32, dense in a ``quant``'s kernel for that projection, or the rank-r factors
   ``B @ A`` of its SVD).

With no crossing (`crossing=None`) the same method is the TD's plain reference: it computes
``x_q @ W0_q.T`` exactly in TD memory and does everything else identically, so greedy tokens
from the two paths are bit-identical (tests/protection/test_masked_equivalence.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from tdllm.model.linear import Linear, LinearMethod, LinearMethodTable, PlainCpuMethod
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.errors import DeviceIntegrityError
from tdllm.trusted.masked_ring import (
    exact_product,
    quantize_activation,
    quantize_weight,
    wide_chunks,
    x_max_for,
)
from tdllm.trusted.modular_freivalds import ModularFreivalds
from tdllm.trusted.pads import DEFAULT_BATCH, IDLE_RESERVE, PadPool, unmask
from tdllm.trusted.public_reference import PublicReference
from tdllm.trusted.publishable import derived_from_public, one_time_padded

OP = "masked_ops.gemm_ring"


@dataclass
class MaskedState:
    """What the TD keeps for one masked projection."""

    device_name: str  # the name its int8 public weight is resident under on the device
    weight_q: torch.Tensor  # int8 [out, in]: public (deterministic from the public base)
    scale: torch.Tensor  # fp64 [out]
    weight_t64: list[torch.Tensor]  # float64 W0_q.T chunks: exact TD products (pads, reference)
    x_max: int
    delta: torch.Tensor | None = None  # dense [out, in] fp32, or None
    # the dense delta held by a quant's method instead (int8/int4 in the TD), or None
    delta_layer: Linear | None = None
    factors: tuple[torch.Tensor, torch.Tensor] | None = None  # (B [out, r], A [r, in]) fp32
    pads: PadPool | None = None
    freivalds: ModularFreivalds | None = None


# BASE's checkpoint tensors a layer is fused from (name -> tensor, in fused order); each layer
# asks once, in module order
BaseWeights = Callable[[Linear], dict[str, torch.Tensor]]


@dataclass
class MaskedReport:
    """Per projection with a delta: relative residual of the kept delta (0: kept exactly)."""

    residuals: dict[str, float] = field(default_factory=dict)
    delta_norms: dict[str, float] = field(default_factory=dict)  # ||MODEL - BASE|| / ||BASE||

    def worst(self) -> float:
        return max(self.residuals.values(), default=0.0)


@dataclass
class MaskedStats:
    calls: int = 0
    rows: int = 0
    checked_calls: int = 0
    layers: list[str] = field(default_factory=list)


class MaskedLinearMethod(PlainCpuMethod):
    """Loads the MODEL weight like the plain method (until `install` replaces it by the
    masked state); `apply` runs masked on `crossing`, or as the TD reference when it is None."""

    leaves_td = True  # each product crosses to the device: never in a compiled graph

    def __init__(
        self,
        crossing: Crossing | None = None,
        check_rate: float = 1.0,
        base: BaseWeights | None = None,
        rank: int | None = None,
        reference: PublicReference | None = None,
        delta_methods: LinearMethodTable | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= check_rate <= 1.0:
            raise ValueError("the Freivalds rate is a probability")
        self.crossing = crossing
        self.check_rate = check_rate
        self.base, self.rank = base, rank
        self.reference = reference  # what BASE must be before its int8 weights may cross
        # a quant's methods by projection name: a dense delta is kept by one of them (None:
        # fp32, as loaded)
        self.delta_methods = delta_methods
        self.failure: DeviceIntegrityError | None = None
        self.stats = MaskedStats()
        self.report = MaskedReport()
        self.states: dict[str, MaskedState] = {}  # by layer name
        self._coin = secrets.SystemRandom()
        self._pools: list[PadPool] = []

    def after_load(self, layer: Linear) -> None:
        """The MODEL weight is loaded: install the layer against BASE's (`install`)."""
        if self.base is None:
            raise RuntimeError(f"{layer.name}: a masked method needs the public base's weights")
        with torch.no_grad():
            parts = self.base(layer)
            w0 = _fused(parts)
            plain = layer.get_parameter("weight").float()
            delta_norm = float((plain - w0).norm() / w0.norm().clamp_min(1e-30))
            residual = self.install(layer, parts, self.rank)
        if delta_norm > 0:
            self.report.delta_norms[layer.name] = delta_norm
            self.report.residuals[layer.name] = residual

    def install(
        self,
        layer: Linear,
        base_parts: Mapping[str, torch.Tensor],
        rank: int | None,
        pad_batch: int = DEFAULT_BATCH,
    ) -> float:
        """Quantize BASE's weight (`base_parts`: the checkpoint tensors the layer is fused from),
        keep ``MODEL - BASE`` as the TD's delta, put the int8 weight on the device once every
        part matches `reference`, drop the plain MODEL weight. Returns the delta's relative
        residual ``||D - D_r|| / ||D||`` (0 when kept exactly or when there is no delta)."""
        plain = layer.get_parameter("weight")
        model_weight = plain.detach().float()
        base_weight = _fused(base_parts)
        q, scale = quantize_weight(base_weight)
        state = MaskedState(layer.name, q, scale, wide_chunks(q), x_max_for(layer.in_features))
        residual = _set_delta(state, model_weight - base_weight, rank)
        if state.delta is not None and self.delta_methods is not None:
            method = self.delta_methods.method_for(layer.name)
            state.delta_layer = kept_by(layer, state.delta, method, plain.dtype)
            state.delta = None
        if self.crossing is not None:
            if self.reference is None:
                raise ValueError(f"{layer.name}: no public reference to check BASE against")
            int8 = derived_from_public(_int8_of, base_parts, self.reference)
            self.crossing.put(state.device_name, int8)
            state.pads = PadPool(state.weight_t64, pad_batch)
            self._pools.append(state.pads)
            state.freivalds = ModularFreivalds(q)
        self.states[layer.name] = state
        layer.weight = nn.Parameter(torch.empty(0, dtype=plain.dtype), requires_grad=False)
        self.stats.layers.append(layer.name)
        return residual

    def precompute_pads(self, reserve: int = IDLE_RESERVE) -> bool:
        """One slice of idle work: top up the first pool below `reserve` by one batch.
        False when every pool is full (nothing left to do while idle)."""
        return any(pool.top_up(reserve) for pool in self._pools)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        state = self.states[layer.name]
        rows = x.reshape(-1, layer.in_features)
        x_q, x_scale = quantize_activation(rows, state.x_max)
        if self.crossing is None:
            y_q = exact_product(x_q, state.weight_t64)
        else:
            y_q = self._offloaded(state, x_q).to(torch.int64)
        y = (y_q.to(torch.float64) * (x_scale[:, None] * state.scale[None, :])).float()
        if state.delta is not None:
            y = y + rows.float() @ state.delta.T
        elif state.delta_layer is not None:
            y = y + state.delta_layer(rows).float()
        elif state.factors is not None:
            b, a = state.factors
            y = y + (rows.float() @ a.T) @ b.T
        self.stats.calls += 1
        self.stats.rows += rows.shape[0]
        return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)

    def _offloaded(self, state: MaskedState, x_q: torch.Tensor) -> torch.Tensor:
        if self.failure is not None:  # once caught lying, the device is never used again
            raise DeviceIntegrityError(
                f"serving stopped after an integrity failure: {self.failure}"
            )
        if self.crossing is None or state.pads is None or state.freivalds is None:
            raise RuntimeError(f"{state.device_name} was installed without a device")
        n, out_f = x_q.shape[0], state.weight_q.shape[0]
        pads, products = state.pads.take(n)
        padded = one_time_padded(x_q, pads)
        masked = padded.tensor
        try:
            y_full = self.crossing.call(
                OP, {"x": padded}, {"y": ((n, out_f), torch.int64)}, {"weight": state.device_name}
            )["y"]
            if self.check_rate >= 1.0 or self._coin.random() < self.check_rate:
                self.stats.checked_calls += 1
                if not state.freivalds.verify(masked, y_full):
                    state.freivalds.new_epoch()
                    raise DeviceIntegrityError(
                        f"Freivalds check failed: the device's product for {state.device_name} "
                        "is not x~ @ W.T; serving through it is stopped"
                    )
        except DeviceIntegrityError as exc:
            self.failure = exc
            raise
        return unmask(y_full, products)


def _fused(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.float() for t in parts.values()])


def kept_by(layer: Linear, delta: torch.Tensor, method: LinearMethod, dtype: torch.dtype) -> Linear:
    """`layer`'s dense delta as a projection of its own on `method` (a quant's kernel, which
    stages and scrubs its copies like any projection's)."""
    kept = Linear(f"{layer.name}.delta", layer.in_features, layer.out_features, method, dtype)
    kept.load_weight(delta)
    method.after_load(kept)
    delta.zero_()  # the fp32 copy is not kept: scrubbed as the methods scrub their staging
    return kept


def _int8_of(parts: list[torch.Tensor]) -> torch.Tensor:
    """BASE's int8 weight: a deterministic function of BASE's public tensors."""
    return quantize_weight(torch.cat([t.float() for t in parts]))[0]


def _set_delta(state: MaskedState, delta: torch.Tensor, rank: int | None) -> float:
    """Keep `delta` in the TD: dense when ``rank`` is None or factoring would not be cheaper,
    else its rank-r SVD; returns the relative residual of what is dropped."""
    if not bool(delta.any()):
        return 0.0
    out_f, in_f = delta.shape
    if rank is None or rank * (out_f + in_f) >= out_f * in_f:
        state.delta = delta.contiguous()
        return 0.0
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    b = (u[:, :rank] * s[:rank]).float().contiguous()
    a = vh[:rank].float().contiguous()
    state.factors = (b, a)
    return float(s[rank:].norm() / s.norm())
