"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seed; the
logits processors that run before it (min_tokens, logit_bias, repetition, frequency and
presence penalties), in vLLM's order and with its definitions; and the logprobs a sequence may
ask for (`LogprobTable`)."""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

MAX_STOP_STRINGS = 4
PENALTY_RANGE = (-2, 2)  # presence_penalty, frequency_penalty (OpenAI's and vLLM's)
REPETITION_PENALTY_MAX = 2  # and greater than 0 (vLLM: any finite > 0; we cap it)
LOGIT_BIAS_RANGE = (-100, 100)  # OpenAI's
MAX_LOGIT_BIAS = 300  # entries in one logit_bias (OpenAI's limit)
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's chat limit; vLLM's default cap)
TOP_P_CANDIDATES = 1024  # tokens sorted for top_p before falling back to the whole vocabulary


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None  # choice i of n samples with seed + i
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks generate a fixed number of tokens
    n: int = 1  # choices: sequences continuing one prompt (one prefill where the model allows)
    presence_penalty: float = 0.0  # subtracted once from each token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in what was generated
    repetition_penalty: float = 1.0  # HF/vLLM: tokens of prompt or output, >0 logits / p, <0 * p
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # no stop token, nor stop string, before this many tokens
    grammar: str | None = None  # llguidance's grammar the output must match (engine.structured)
    # None: no logprobs; N: each token's logprob and the N most likely alternatives (vLLM's)
    logprobs: int | None = None
    # whose prefix-cache blocks the request may hit and adds to (the front: one scope per API
    # key), so no client can time another's prompts; an opaque digest, never shown in a repr
    cache_scope: bytes = field(default=b"", repr=False)

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
        if self.n < 1:
            raise ValueError("n must be at least 1")
        low, high = PENALTY_RANGE
        if not (low <= self.presence_penalty <= high and low <= self.frequency_penalty <= high):
            raise ValueError(f"presence and frequency penalties must be in [{low:g}, {high:g}]")
        if not (0.0 < self.repetition_penalty <= REPETITION_PENALTY_MAX):
            raise ValueError(f"repetition_penalty must be in (0, {REPETITION_PENALTY_MAX:g}]")
        low, high = LOGIT_BIAS_RANGE
        if len(self.logit_bias) > MAX_LOGIT_BIAS or not all(
            token >= 0 and low <= bias <= high for token, bias in self.logit_bias
        ):
            raise ValueError(
                f"logit_bias: at most {MAX_LOGIT_BIAS} token ids >= 0, biases in "
                f"[{low:g}, {high:g}]"
            )
        if not (0 <= self.min_tokens <= self.max_tokens):
            raise ValueError("min_tokens must be in [0, max_tokens]")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def processes_logits(self) -> bool:
        """Whether anything changes the logits before sampling (`LogitsProcessor`)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
        )

    def generator(self, index: int = 0) -> torch.Generator:
        """A private RNG: a request's samples depend only on its seed, not on its batch mates.
        Choice `index` of `n` uses ``seed + index``, so each choice is reproducible alone."""
        seed = self.seed + index if self.seed is not None else secrets.randbits(63)
        return torch.Generator().manual_seed(seed)


class LogitsProcessor:
    """What one sequence's logits go through before `sample`, in vLLM's order (v1 `Sampler`):
    min_tokens (stop tokens at -inf until `min_tokens` are out), logit_bias (added), then the
    penalties (`vllm.model_executor.layers.utils.apply_penalties`): repetition over the prompt
    and the output (a logit > 0 divided by it, any other multiplied), frequency (times each
    token's count in the output) and presence (once per token in the output) subtracted.
    Greedy takes the argmax after all of them."""

    def __init__(
        self,
        params: SamplingParams,
        prompt: Sequence[int],
        vocab_size: int,
        stop_token_ids: Iterable[int],
    ) -> None:
        self.params = params
        self.produced = 0
        penalized = params.presence_penalty or params.frequency_penalty
        repeats = params.repetition_penalty != 1.0
        self.counts = torch.zeros(vocab_size) if penalized or repeats else None
        self.prompt_mask: torch.Tensor | None = None
        if repeats:
            self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool)
            self.prompt_mask[torch.tensor(list(prompt), dtype=torch.long)] = True
        self.bias: torch.Tensor | None = None
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size)
            for token, bias in params.logit_bias:  # a token given twice: the last bias (vLLM)
                self.bias[token] = bias
        stops = sorted(t for t in stop_token_ids if t < vocab_size)
        self.stop_ids = torch.tensor(stops, dtype=torch.long)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """New float32 logits (the row given may be shared by the choices of one prefill)."""
        params = self.params
        out = logits.float().clone()
        if self.produced < params.min_tokens and len(self.stop_ids):
            out[self.stop_ids] = -math.inf
        if self.bias is not None:
            out += self.bias
        if self.counts is not None:
            seen = self.counts > 0
            if self.prompt_mask is not None:
                penalty = params.repetition_penalty
                scaled = torch.where(out > 0, out / penalty, out * penalty)
                out = torch.where(seen | self.prompt_mask, scaled, out)
            if params.frequency_penalty:
                out -= params.frequency_penalty * self.counts
            if params.presence_penalty:
                out -= params.presence_penalty * seen.float()
        return out

    def add(self, token: int) -> None:
        """`token` was generated."""
        self.produced += 1
        if self.counts is not None:
            self.counts[token] += 1


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
        probs = logits.softmax(-1)
        # the nucleus is almost always among the most likely few hundred tokens: sort those
        # (topk, ~0.3 ms) and the whole vocabulary (~3.4 ms for 49k) only when they fall short
        top, order = torch.topk(probs, min(TOP_P_CANDIDATES, probs.numel()))
        if float(top.sum()) < params.top_p:
            top, order = torch.sort(probs, descending=True)
        # keep a token while the mass before it is short of top_p (the first always stays);
        # every token past the candidates has at least their mass before it
        keep = order[(top.cumsum(-1) - top) < params.top_p]
        logits = torch.full_like(logits, -math.inf).index_copy_(0, keep, logits[keep])
    # inverse transform: one uniform number against the cumulative distribution. Not
    # torch.multinomial, which draws an exponential variate per vocabulary entry: ~1.2 ms a row
    # for a 49k vocabulary here, 37 ms of a 32-sequence decode step (docs/performance.md)
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand((), dtype=torch.float64, generator=generator) * cdf[-1]
    index = int(torch.searchsorted(cdf, u, right=True))  # the first token whose mass passes u
    if index == cdf.numel():  # u rounded up to the total: the last token with any mass
        index = int(torch.searchsorted(cdf, cdf[-1]))
    return index


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token's log-probability and the `n` most likely tokens at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


class LogprobTable:
    """The log-probabilities of the rows of one step whose sequences asked for them, computed
    together (one log-softmax, one top-k for the batch); sequences that did not ask cost nothing.

    They are the raw model's: the log-softmax of the logits as the model produced them, before
    penalties, logit_bias, min_tokens, a grammar's mask and temperature. That is vLLM's default
    (``logprobs_mode="raw_logprobs"``); a token the sampler could not pick still has its
    model probability.
    """

    def __init__(self, logits: torch.Tensor, counts: Sequence[int]) -> None:
        """`logits` ``[rows, vocab]``; `counts[i]`: the alternatives row i asked for."""
        self.logprobs = torch.log_softmax(logits.float(), dim=-1)
        self.counts = list(counts)
        most = min(max(self.counts, default=0), self.logprobs.shape[-1])
        self.top_values, self.top_ids = torch.topk(self.logprobs, most, dim=-1)

    def of(self, row: int, token: int) -> TokenLogprobs:
        """Row `row`'s logprobs with `token` the one the sampler chose."""
        n = self.counts[row]
        values = self.top_values[row, :n].tolist()
        ids = self.top_ids[row, :n].tolist()
        return TokenLogprobs(
            token, float(self.logprobs[row, token]), tuple(zip(ids, values, strict=True))
        )
