"""The `obfuscated` profile's TD side (seed 000, "hide the tree in the forest"; design §7.2).

Two transforms, both static for the life of the model (which is why they break, §7.2/§9):

- **ShadowNet linear** (`shadow_obfuscate`): a weight's output rows are scaled by secret
  factors, padded with decoy rows drawn from a normal fitted to the real rows, and permuted.
  The device returns the padded product; the TD keeps the real rows and undoes the scales
  (`ShadowSecret.restore`). Used for v, o, gate|up, down and the lm_head.
- **Decoy RoPE pairs in Wq/Wk** (`pad_qk`): each head gets `pairs` decoy column pairs
  (η = 1/16 of the head dimension by default) with frequencies drawn from the real RoPE table,
  and every pair, real or decoy, is scaled (c on q, 1/c on k: q·k is unchanged) and shuffled
  within its KV group. The device computes the padded scores ``qk_ = qk + q'k'ᵀ``; the TD
  computes the decoy scores ``q'k'ᵀ`` from its own copy of the decoy weights and subtracts them
  before the softmax (`ObfuscatedAttention`).

Secrets (permutations, scales, decoy weights) are drawn from a generator seeded from the OS
CSPRNG unless a seed is given (tests), and never cross; the padded weights do (they are what
the device multiplies with).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch

from tdllm.model.transformer import Batch
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.publishable import plaintext_activation

DEFAULT_ETA = 1 / 16
WORK = torch.float32  # the transforms are computed in fp32 and cast to the model's dtype
SCALE_RANGE = (0.5, 2.0)  # secret per-row scales, log-uniform


def generator(seed: int | None) -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)


def _scales(n: int, gen: torch.Generator) -> torch.Tensor:
    lo, hi = (math.log(s) for s in SCALE_RANGE)
    return torch.exp(lo + (hi - lo) * torch.rand(n, generator=gen, dtype=WORK))


def decoys_like(
    weight: torch.Tensor, rows: int, gen: torch.Generator, stats: tuple[float, float] | None = None
) -> torch.Tensor:
    """`rows` decoy rows from a normal with the real matrix's mean and std (seed 000)."""
    mean, std = stats or moments(weight)
    noise = torch.randn(rows, weight.shape[1], generator=gen, dtype=WORK)
    return mean + std * noise


def moments(weight: torch.Tensor) -> tuple[float, float]:
    w = weight.double()  # the sums only: exact enough for any size
    return float(w.mean()), float(w.std())


@dataclass
class ShadowSecret:
    """Where each real output row sits in the padded product, and its inverse scale."""

    index: torch.Tensor  # [out] int64: device row of real row i
    inv_scale: torch.Tensor  # [out]

    def restore(self, padded: torch.Tensor) -> torch.Tensor:
        real = padded.index_select(-1, self.index)
        return real * self.inv_scale.to(padded.dtype)


def shadow_obfuscate(
    weight: torch.Tensor, eta: float, gen: torch.Generator
) -> tuple[torch.Tensor, ShadowSecret]:
    """``P·[diag(s)·W; diag(s')·D]`` and the secret that restores ``x @ W.T``."""
    out = weight.shape[0]
    extra = max(1, math.ceil(eta * out))
    rows = torch.cat((weight.to(WORK), decoys_like(weight, extra, gen)))
    scale = _scales(out + extra, gen)
    rows = rows * scale[:, None]
    order = torch.randperm(out + extra, generator=gen)  # device row j holds row order[j]
    position = torch.empty_like(order)
    position[order] = torch.arange(out + extra)
    padded = rows[order]
    return padded, ShadowSecret(position[:out].clone(), 1.0 / scale[:out])


@dataclass
class QKSecret:
    """One layer's decoy RoPE pairs: what the TD needs to subtract them, and the truth."""

    heads: int
    kv_heads: int
    head_dim: int  # real
    pairs: int  # decoy pairs per head
    pad_q: torch.Tensor  # [heads, 2*pairs, hidden] decoy q rows (scaled), rotate-half layout
    pad_k: torch.Tensor  # [kv_heads, 2*pairs, hidden]
    decoy_freq: torch.Tensor  # [kv_heads, pairs]
    device_freq: torch.Tensor  # [kv_heads, half + pairs]: what the device rotates slot j by
    slot_of_unit: torch.Tensor  # [kv_heads, half + pairs]: device slot of pair unit u
    # (units < half are real pairs, the rest decoys); for scoring attacks, never sent

    @property
    def dim(self) -> int:
        return self.head_dim + 2 * self.pairs

    def q_row(self, head: int, row: int) -> int:
        """Device row (within the padded q block) of real row `row` of q head `head`."""
        return head * self.dim + self._slot_row(head // (self.heads // self.kv_heads), row)

    def k_row(self, kv_head: int, row: int) -> int:
        return kv_head * self.dim + self._slot_row(kv_head, row)

    def _slot_row(self, group: int, row: int) -> int:
        half = self.head_dim // 2
        slot = int(self.slot_of_unit[group, row % half])
        return slot + (row // half) * (half + self.pairs)

    def decoy_slots(self, group: int) -> list[int]:
        half = self.head_dim // 2
        return [int(s) for s in self.slot_of_unit[group, half:]]


def decoy_pairs(head_dim: int, eta: float) -> int:
    """Decoy RoPE pairs per head: η of the head's columns, at least one pair."""
    return max(1, round(eta * head_dim / 2))


def pad_qk(
    wq: torch.Tensor,
    wk: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
    inv_freq: torch.Tensor,
    eta: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, QKSecret]:
    """Padded, scaled, shuffled q and k weights and the layer's `QKSecret`."""
    hidden, half = wq.shape[1], head_dim // 2
    pairs = decoy_pairs(head_dim, eta)
    units = half + pairs
    group = heads // kv_heads
    q_dev = torch.empty(heads, 2 * units, hidden, dtype=WORK)
    k_dev = torch.empty(kv_heads, 2 * units, hidden, dtype=WORK)
    pad_q = torch.empty(heads, 2 * pairs, hidden, dtype=WORK)
    pad_k = torch.empty(kv_heads, 2 * pairs, hidden, dtype=WORK)
    decoy_freq = torch.empty(kv_heads, pairs, dtype=WORK)
    device_freq = torch.empty(kv_heads, units, dtype=WORK)
    slot_of_unit = torch.empty(kv_heads, units, dtype=torch.int64)
    q_stats, k_stats = moments(wq), moments(wk)
    wq_h = wq.to(WORK).view(heads, head_dim, hidden)
    wk_h = wk.to(WORK).view(kv_heads, head_dim, hidden)
    for g in range(kv_heads):
        # decoy frequencies duplicate real ones (a new frequency would flag the pair at once)
        freqs = torch.cat(
            (inv_freq.to(WORK), inv_freq.to(WORK)[torch.randperm(half, generator=gen)[:pairs]])
        )
        scale = _scales(units, gen)
        k_units = _units(wk_h[g], half)  # [units<half, 2, hidden]
        k_units = torch.cat(
            (k_units, decoys_like(wk, 2 * pairs, gen, k_stats).view(pairs, 2, hidden))
        )
        k_units = k_units / scale[:, None, None]
        order = torch.randperm(units, generator=gen)  # slot j holds unit order[j]
        slot_of_unit[g, order] = torch.arange(units)
        device_freq[g] = freqs[order]
        decoy_freq[g] = freqs[half:]
        k_dev[g] = _rows(k_units[order])
        pad_k[g] = _rows(k_units[half:])
        for h in range(g * group, (g + 1) * group):
            q_units = _units(wq_h[h], half)
            q_units = torch.cat(
                (q_units, decoys_like(wq, 2 * pairs, gen, q_stats).view(pairs, 2, hidden))
            )
            q_units = q_units * scale[:, None, None]
            q_dev[h] = _rows(q_units[order])
            pad_q[h] = _rows(q_units[half:])
    secret = QKSecret(
        heads, kv_heads, head_dim, pairs, pad_q, pad_k, decoy_freq, device_freq, slot_of_unit
    )
    return q_dev.reshape(-1, hidden), k_dev.reshape(-1, hidden), secret


def _units(w_head: torch.Tensor, half: int) -> torch.Tensor:
    """Rotate-half rows ``[2*half, hidden]`` -> pair units ``[half, 2, hidden]``."""
    return torch.stack((w_head[:half], w_head[half:]), dim=1)


def _rows(units: torch.Tensor) -> torch.Tensor:
    """Pair units ``[n, 2, hidden]`` -> rotate-half rows ``[2n, hidden]``."""
    return torch.cat((units[:, 0], units[:, 1]))


@dataclass
class Deviation:
    """Running sums for the seed's figures: ‖qk-qk_‖/‖qk‖ and ‖s-s_‖/‖s‖, qk_ and s_ with the
    decoy scores NOT removed (visible entries only, scores scaled by 1/√head_dim)."""

    score_diff: float = 0.0
    score_norm: float = 0.0
    prob_diff: float = 0.0
    prob_norm: float = 0.0

    def ratios(self) -> tuple[float, float]:
        return (
            math.sqrt(self.score_diff / self.score_norm),
            math.sqrt(self.prob_diff / self.prob_norm),
        )


@dataclass
class ObfuscatedAttention:
    """Attention of one layer with the padded scores from the device (the model's core hook)."""

    crossing: Crossing
    layer: str
    secret: QKSecret
    v_secret: ShadowSecret
    v_rows: int
    max_batch: int
    max_seq: int
    deviation: Deviation | None = None  # set to record the seed's figures during a run
    _inv_freq: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self._inv_freq = self.secret.decoy_freq.float()

    def __call__(
        self, x: torch.Tensor, batch: Batch, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        s = self.secret
        B, T, _ = x.shape
        span = batch.span
        out = self.crossing.call(
            "obfuscated_ops.attention_scores",
            {"x": plaintext_activation(x)},
            {
                "scores": ((B, s.heads, T, span), torch.float32),
                "v": ((B, T, self.v_rows), x.dtype),
            },
            {
                "layer": self.layer,
                "heads": s.heads,
                "kv_heads": s.kv_heads,
                "dim": s.dim,
                "slots": batch.slots,
                "starts": batch.starts,
                "max_batch": self.max_batch,
                "max_seq": self.max_seq,
            },
        )
        v = self.v_secret.restore(out["v"]).view(B, T, s.kv_heads, s.head_dim).transpose(1, 2)
        batch.write(v_cache, v)

        # the decoy scores, from the TD's decoy weights; decoy keys live in the first
        # 2*pairs columns of the TD's key cache (the real keys exist only on the device)
        group = s.heads // s.kv_heads
        pad_q = s.pad_q.to(x.dtype).reshape(-1, x.shape[-1])
        pad_k = s.pad_k.to(x.dtype).reshape(-1, x.shape[-1])
        qd = (x @ pad_q.T).float().view(B, T, s.heads, 2 * s.pairs).transpose(1, 2)
        kd = (x @ pad_k.T).float().view(B, T, s.kv_heads, 2 * s.pairs).transpose(1, 2)
        angles = batch.positions[:, None, :, None].float() * self._inv_freq[None, :, None, :]
        cos = torch.cat((angles.cos(), angles.cos()), dim=-1)
        sin = torch.cat((angles.sin(), angles.sin()), dim=-1)
        qd = _rope(qd, cos.repeat_interleave(group, 1), sin.repeat_interleave(group, 1))
        kd = _rope(kd, cos, sin)
        decoy_cache = k_cache[..., : 2 * s.pairs]
        batch.write(decoy_cache, kd.to(k_cache.dtype))
        keys = batch.read(decoy_cache).float().repeat_interleave(group, dim=1)
        padded = out["scores"]
        scores = padded - qd @ keys.transpose(-1, -2)

        visible = _visible(batch, T, span)
        scale = 1.0 / math.sqrt(s.head_dim)
        probs = torch.softmax((scores * scale).masked_fill(~visible, float("-inf")), dim=-1)
        if self.deviation is not None:
            self._record(scores * scale, padded * scale, probs, visible)
        values = batch.read(v_cache).repeat_interleave(group, dim=1)
        y = probs.to(values.dtype) @ values
        return y.transpose(1, 2).reshape(B, T, -1)

    def _record(
        self, true: torch.Tensor, padded: torch.Tensor, probs: torch.Tensor, visible: torch.Tensor
    ) -> None:
        d = self.deviation
        if d is None:
            return
        mask = visible.float()
        d.score_diff += float(((true - padded) * mask).pow(2).sum())
        d.score_norm += float((true * mask).pow(2).sum())
        probs_ = torch.softmax(padded.masked_fill(~visible, float("-inf")), dim=-1)
        d.prob_diff += float((probs - probs_).pow(2).sum())
        d.prob_norm += float(probs.pow(2).sum())


def _visible(batch: Batch, T: int, span: int) -> torch.Tensor:
    """``[B, 1, T, span]`` True where a query may attend a key (causal, per-row positions)."""
    keys = torch.arange(span)
    return keys[None, None, None, :] <= batch.positions[:, None, :, None]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
