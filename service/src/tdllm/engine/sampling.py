"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seed."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

MAX_STOP_STRINGS = 4


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks generate a fixed number of tokens

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not (0.0 <= self.temperature <= 2.0) or math.isnan(self.temperature):
            raise ValueError("temperature must be between 0 and 2")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be 0 (off) or positive")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise ValueError(f"at most {MAX_STOP_STRINGS} non-empty stop strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator:
        """A private RNG: a request's samples depend only on its seed, not on its batch mates."""
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator().manual_seed(seed)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from one row of logits ``[vocab]``."""
    logits = logits.float()
    if params.greedy:
        return int(logits.argmax())
    # float64, where every positive temperature the API accepts is nonzero, shifted first (softmax
    # does not change): a tiny temperature then sends every logit but the largest to -inf, never
    # to inf - inf = NaN (or 0 / 0), which made multinomial fail the whole engine step
    logits = (logits.double() - logits.max()) / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (the first always stays)
        drop = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.scatter(0, order[drop], -math.inf)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
