"""A14: the device tampers with its results; how many forgeries does the TD accept?

Target: the `masked` profile's exact path. The device holds the public int8 weight of a real
projection (by default two of the bundled SmolLM2's layer-0 projections: qkv, 576 -> 960, and
down, 1536 -> 576) and answers `masked_ops.gemm_ring` calls honestly, then a tampering wrapper
(the adversary, G4) rewrites the answer before the TD sees it, one forgery per trial, cycling
through the kinds protection.md section 9 lists:

- ``plus_one``: +1 on one word (the smallest change; a float check would call it rounding);
- ``high_bit``: +2^31 on one word (the top bit of Z_2^32, which a mod-2^32 Freivalds check
  misses half the time);
- ``prime_multiple``: + p1 (= 2^31 - 1, one of the check primes) on one word;
- ``random_word``: one word replaced by a random value within the honest range;
- ``row_noise``: small random changes (+-1..8) on every word of one row;
- ``replay``: the previous call's answer for the same shape (stale but well-formed);
- ``cancel_pair``: +e on one word and -e on another (cancels in a plain sum check).

Each trial is one real masked call (fresh pads, a fresh activation) whose outcome is read from
the TD: a `DeviceIntegrityError` is a detection. Honest calls are interleaved to count false
alarms. After a detection the harness re-arms the layer (the TD itself would stop serving; the
check vectors are re-drawn on every failure, so trials are independent). A forgery that does
not change the unmasked result (none of the kinds above) would not count as undetected.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

from tdllm.errors import UsageError
from tdllm.model.linear import Linear
from tdllm.sources import open_checkpoint
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.errors import DeviceIntegrityError
from tdllm.trusted.masked_linear import OP, MaskedLinearMethod
from tdllm.trusted.modular_freivalds import PRIMES
from tdllm.trusted.public_reference import PublicReference
from tdllm_lab.attacks.result import AttackOptions, AttackResult

KINDS = (
    "plus_one",
    "high_bit",
    "prime_multiple",
    "random_word",
    "row_noise",
    "replay",
    "cancel_pair",
)
TRIALS, QUICK_TRIALS = 10_000, 700
PROJECTIONS = ("model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.down_proj")
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class TamperingDevice:
    """Wraps an honest device; rewrites the ``y`` of `gemm_ring` answers when armed."""

    def __init__(self, inner: Any, seed: int) -> None:
        self.inner = inner
        self.kind_to_apply: str | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self.previous: dict[tuple[int, ...], torch.Tensor] = {}
        self.changed = False  # whether the last armed call really changed the answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def call(self, op: str, args: dict[str, torch.Tensor], params: dict[str, Any]) -> Any:
        out = self.inner.call(op, args, params)
        if op != OP or self.kind_to_apply is None:
            return out
        honest = out["y"]
        forged = self._forge(honest, self.kind_to_apply)
        self.previous[tuple(honest.shape)] = honest.clone()
        self.changed = not torch.equal(forged, honest)
        return {"y": forged}

    def _rand(self, high: int, size: tuple[int, ...] = ()) -> torch.Tensor:
        return torch.randint(0, high, size or (1,), generator=self.generator)

    def _forge(self, honest: torch.Tensor, kind: str) -> torch.Tensor:
        y = honest.clone()
        n, out_f = y.shape
        row, col = int(self._rand(n)), int(self._rand(out_f))
        if kind == "plus_one":
            y[row, col] += 1
        elif kind == "high_bit":
            y[row, col] += 1 << 31
        elif kind == "prime_multiple":
            y[row, col] += PRIMES[0]
        elif kind == "random_word":
            y[row, col] = int(self._rand(1 << 40)) - (1 << 39)
        elif kind == "row_noise":
            noise = self._rand(16, (out_f,)) - 8
            noise[noise == 0] = 1
            y[row] += noise
        elif kind == "replay":
            stale = self.previous.get(tuple(y.shape))
            y = stale.clone() if stale is not None else y + 1
        elif kind == "cancel_pair":
            other = (col + 1 + int(self._rand(out_f - 1))) % out_f
            e = int(self._rand(1 << 20)) + 1
            y[row, col] += e
            y[row, other] -= e
        else:
            raise ValueError(kind)
        return y


def projection_weights(names: tuple[str, ...] = PROJECTIONS) -> dict[str, torch.Tensor]:
    """The bundled base's (fused) weights for `names`, read from the public checkpoint."""
    wanted = {f"{n.rpartition('.')[0]}.{p}.weight": n for n in names for p in _parts(n)}
    found: dict[str, torch.Tensor] = {}
    for ckpt_name, tensor in open_checkpoint("bundled").tensors():
        if ckpt_name in wanted:
            found[ckpt_name] = tensor.float()
    return {
        n: torch.cat([found[f"{n.rpartition('.')[0]}.{p}.weight"] for p in _parts(n)])
        for n in names
    }


def _parts(name: str) -> tuple[str, ...]:
    leaf = name.rpartition(".")[2]
    return FUSED.get(leaf, (leaf,))


def measure(
    weights: dict[str, torch.Tensor],
    device: str,
    trials: int,
    seed: int = 0,
    kinds: tuple[str, ...] = KINDS,
) -> dict[str, Any]:
    """Run `trials` forgeries (and as many honest calls) against masked `weights`."""
    crossing = Crossing.open(device)
    tamper = TamperingDevice(crossing.device, seed)
    crossing = Crossing(tamper)
    # the attack's weights play BASE: public by declaration, so their int8 form may cross
    public = PublicReference.build("a14", weights.items())
    method = MaskedLinearMethod(crossing, reference=public)
    layers = []
    for name, w in weights.items():
        layer = Linear(name, w.shape[1], w.shape[0], method, torch.float32)
        layer.load_weight(w)
        method.install(layer, {name: w}, None)
        layers.append(layer)
    g = torch.Generator().manual_seed(seed + 1)
    undetected: Counter[str] = Counter()
    detected: Counter[str] = Counter()
    false_alarms = 0
    start = time.perf_counter()
    try:
        for i, (kind, layer) in enumerate(_schedule(kinds, layers, trials)):
            x = torch.randn(1 + i % 3, layer.in_features, generator=g)
            tamper.kind_to_apply = None
            try:  # an honest call between forgeries: must never alarm
                layer(x)
            except DeviceIntegrityError:
                false_alarms += 1
                method.failure = None
            tamper.kind_to_apply = kind
            try:
                layer(x)
            except DeviceIntegrityError:
                detected[kind] += 1
                method.failure = None  # re-arm for the next, independent trial
            else:
                if tamper.changed:
                    undetected[kind] += 1
    finally:
        crossing.close()
    return {
        "trials": trials,
        "device": device,
        "projections": {n: list(w.shape) for n, w in weights.items()},
        "detected": dict(detected),
        "undetected": dict(undetected),
        "undetected_total": sum(undetected.values()),
        "false_alarms": false_alarms,
        "honest_calls": trials,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _schedule(
    kinds: tuple[str, ...], layers: list[Linear], trials: int
) -> Iterator[tuple[str, Linear]]:
    for i in range(trials):
        yield kinds[i % len(kinds)], layers[(i // len(kinds)) % len(layers)]


def run(options: AttackOptions) -> AttackResult:
    if options.profile != "masked":
        raise UsageError("A14 measures the masked profile's exact path: use --profile masked")
    trials = QUICK_TRIALS if options.quick else TRIALS
    detail = measure(projection_weights(), options.device, trials, options.seed)
    bad = detail["undetected_total"]
    return AttackResult(
        attack="A14",
        profile=options.profile,
        metric="undetected tampered device results (rate)",
        value=bad / trials,
        passed=bad == 0 and detail["false_alarms"] == 0,
        detail=detail,
    )
