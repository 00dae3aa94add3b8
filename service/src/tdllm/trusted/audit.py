"""Re-execution audits: the TD recomputes the public prefix for a secret fraction of requests.

A host that forges hidden states (to use the private tail as an oracle, or to steer answers) is
caught with probability ``1 - (1 - f)^N`` over N forged requests. The coin is drawn per request
from the OS CSPRNG when its prefill starts, and never crosses. An audited request is then
checked at every step of its life, against the TD's own prefix KV cache for its slot.

On the CPU the recomputation is bit-identical when the audit replays the device's exact batch
(every row of the step audited, e.g. f = 1); rows recomputed in a smaller batch go through other
GEMM shapes, so they are compared within `tolerance` (relative to the row's largest value). A
device whose arithmetic is not the TD's (a GPU) is never bit-identical: with `exact_replay` off
every comparison uses the tolerance (device_rounding.py). `max_deviation` keeps the largest
relative deviation seen, which is how the tolerances were measured (`tdllm bench tolerance`).
"""

from __future__ import annotations

import dataclasses
import math
import secrets

import torch

from tdllm.model.transformer import Batch, KVCache, Transformer
from tdllm.trusted.errors import DeviceIntegrityError


class ReexecutionAudit:
    def __init__(
        self,
        model: Transformer,
        num_layers: int,
        rate: float,
        max_batch: int,
        max_seq_len: int,
        tolerance: float = 1e-4,
        exact_replay: bool = True,
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError("the audit rate is a probability")
        self.model, self.num_layers, self.rate, self.tolerance = model, num_layers, rate, tolerance
        self.exact_replay = exact_replay
        self.max_deviation = 0.0
        cfg = dataclasses.replace(model.cfg, num_layers=num_layers)
        self.cache = KVCache(cfg, max_batch, max_seq_len, model.dtype)
        self.audited: set[int] = set()
        self._coin = secrets.SystemRandom()
        self.checked_rows = 0

    def check(self, tokens: torch.Tensor, batch: Batch, hidden: torch.Tensor) -> None:
        """Draw coins for new requests; recompute audited rows; raise on any difference."""
        for slot, start in zip(batch.slots, batch.starts, strict=True):
            if start == 0:  # a new request (even a one-token prompt) takes this slot
                self.audited.discard(slot)
                if self._coin.random() < self.rate:
                    self.audited.add(slot)
        rows = [i for i, slot in enumerate(batch.slots) if slot in self.audited]
        if not rows:
            return
        exact = len(rows) == len(batch.slots)
        sub = (
            batch
            if exact
            else Batch(
                [batch.slots[i] for i in rows], [batch.starts[i] for i in rows], batch.num_tokens
            )
        )
        with torch.inference_mode():
            x = self.model.embed_tokens(tokens[rows])
            honest = self.model.forward_blocks(x, sub, self.cache, 0, self.num_layers)
        got = hidden[rows]
        scale = honest.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
        deviation = float(((got.float() - honest.float()).abs() / scale.float()).amax())
        if math.isfinite(deviation):
            self.max_deviation = max(self.max_deviation, deviation)
        if exact and self.exact_replay:
            bad = not torch.equal(got, honest)
        else:  # NaN compares False: a non-finite row must fail, not pass
            bad = not deviation <= self.tolerance
        self.checked_rows += len(rows)
        if bad:
            slots = [batch.slots[i] for i in rows]
            raise DeviceIntegrityError(
                f"re-execution audit failed: the device's hidden states for slots {slots} differ "
                "from the TD's recomputation of the public prefix; serving through it is stopped"
            )
