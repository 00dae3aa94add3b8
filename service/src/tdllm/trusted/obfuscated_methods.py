"""The `obfuscated` profile's linear methods: each loads its plain weight, then in `after_load`
puts the obfuscated weight on the device (trusted/obfuscation.py has the transforms), keeps the
secret in the TD's `Obfuscation`, and drops the plaintext weight from TD memory.

- `ShadowMethod` (v is inside q|k|v; o, gate|up, down, lm_head): the padded product comes back
  from the device and the TD restores the real rows.
- `PaddedQKVMethod` (q|k|v): decoy RoPE pairs in q and k, v ShadowNet-obfuscated; its product
  runs inside the layer's `ObfuscatedAttention` core, which the profile places on the model.

The device's names: ``model.layers.N.{qkv,inv_freq,o,gate_up,down}`` and ``lm_head``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tdllm.model.config import ModelConfig
from tdllm.model.linear import Linear, PlainCpuMethod
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.obfuscation import (
    Deviation,
    ObfuscatedAttention,
    QKSecret,
    ShadowSecret,
    generator,
    pad_qk,
    shadow_obfuscate,
)
from tdllm.trusted.publishable import obfuscated, plaintext_activation

SHORT = {"o_proj": "o", "gate_up_proj": "gate_up", "down_proj": "down"}


@dataclass
class Obfuscation:
    """The secrets of one obfuscated model (TD only), by the device's resident names."""

    crossing: Crossing
    cfg: ModelConfig
    eta: float
    seed: int | None
    max_batch: int
    max_seq_len: int
    shadow: dict[str, ShadowSecret] = field(default_factory=dict)  # resident -> secret
    qk: dict[str, QKSecret] = field(default_factory=dict)  # "model.layers.N" -> secret
    cores: list[ObfuscatedAttention] = field(default_factory=list)  # in layer order
    gen: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        cfg = self.cfg
        if cfg.head_dim % 2 or cfg.num_heads % cfg.num_kv_heads:
            raise ValueError("obfuscated needs an even head_dim and whole GQA groups")
        if not 0 < self.eta <= 1:
            raise ValueError("eta must be in (0, 1]")
        self.gen = generator(self.seed)

    def record_deviation(self) -> list[Deviation]:
        """Start recording the seed's deviation figures, one `Deviation` per layer."""
        for core in self.cores:
            core.deviation = Deviation()
        return [core.deviation for core in self.cores if core.deviation is not None]

    def inv_freq(self) -> torch.Tensor:
        d, theta = self.cfg.head_dim, self.cfg.rope_theta
        return 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))


class ShadowMethod(PlainCpuMethod):
    """A ShadowNet-obfuscated projection: padded product on the device, real rows in the TD."""

    leaves_td = True  # its product is the device's: never in a compiled graph

    def __init__(self, obfuscation: Obfuscation) -> None:
        super().__init__()
        self.ob = obfuscation
        self.placed: dict[str, tuple[str, int, ShadowSecret]] = {}  # layer -> resident, rows

    def after_load(self, layer: Linear) -> None:
        resident = resident_name(layer.name)
        weight = _take_weight(layer)
        padded, secret = shadow_obfuscate(weight, self.ob.eta, self.ob.gen)
        self.ob.crossing.put(resident, obfuscated(padded.to(weight.dtype)))
        self.ob.shadow[resident] = secret
        self.placed[layer.name] = (resident, padded.shape[0], secret)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        resident, rows, secret = self.placed[layer.name]
        out = self.ob.crossing.call(
            "obfuscated_ops.linear",
            {"x": plaintext_activation(x)},
            {"y": ((*x.shape[:-1], rows), x.dtype)},
            {"weight": resident},
        )
        return secret.restore(out["y"])


class PaddedQKVMethod(PlainCpuMethod):
    """q|k|v with decoy RoPE pairs and an obfuscated v; computed by the layer's core."""

    leaves_td = True  # its product is the device's: never in a compiled graph

    def __init__(self, obfuscation: Obfuscation) -> None:
        super().__init__()
        self.ob = obfuscation

    def after_load(self, layer: Linear) -> None:
        ob, cfg = self.ob, self.ob.cfg
        prefix = layer.name.removesuffix(".self_attn.qkv_proj")
        weight = _take_weight(layer)
        wq, wk, wv = weight.split(layer.shard_sizes)
        q_dev, k_dev, qk = pad_qk(
            wq, wk, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, ob.inv_freq(), ob.eta, ob.gen
        )
        v_dev, v_secret = shadow_obfuscate(wv, ob.eta, ob.gen)
        qkv = torch.cat((q_dev, k_dev, v_dev)).to(weight.dtype)
        ob.crossing.put(f"{prefix}.qkv", obfuscated(qkv))
        ob.crossing.put(f"{prefix}.inv_freq", obfuscated(qk.device_freq.float()))
        ob.qk[prefix], ob.shadow[f"{prefix}.v"] = qk, v_secret
        ob.cores.append(
            ObfuscatedAttention(
                ob.crossing, prefix, qk, v_secret, v_dev.shape[0], ob.max_batch, ob.max_seq_len
            )
        )

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{layer.name} runs inside the obfuscated attention core")


def resident_name(layer: str) -> str:
    """The device's name for a projection's obfuscated weight."""
    prefix, _, leaf = layer.rpartition(".")
    if not prefix:
        return leaf  # lm_head
    return f"{prefix.rsplit('.', 1)[0]}.{SHORT[leaf]}"


def _take_weight(layer: Linear) -> torch.Tensor:
    """The loaded plaintext weight, detached from the layer: TD memory drops it once the
    obfuscated copy is on the device (a tied lm_head's is the embedding's, kept)."""
    weight = layer.get_parameter("weight").detach()
    delattr(layer, "weight")
    return weight
