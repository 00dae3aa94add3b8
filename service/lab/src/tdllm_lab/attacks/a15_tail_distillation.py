"""A15: an API user distils the private tail of `split` from its answers, with and without logprobs.

The attacker (an API user, G3) holds the public base, so the prefix (embedding and blocks
``0..L-K-1``) is theirs: they can compute the hidden state entering block ``L-K`` for any text.
They lack the tail (blocks ``L-K..L-1``, the final norm, the lm_head). They send prompts to the
service, which runs the private model under `split`, and train a copy of the base's tail (their
natural starting point) on the answers:

- text: only the sampled tokens (temperature 1), what every API gives (`logprobs_policy`
  "off"): cross-entropy on them, an unbiased but noisy estimate of KL(private || theirs);
- top-N logprobs (`logprobs_policy` "top-k:N"): at each position the N most likely tokens and
  the chosen one with their log-probabilities, the rest of the mass one bucket: cross-entropy
  over those buckets, far less noise per query.

Both train on the same answers (one served run with logprobs; the text attacker ignores them),
with the same steps, learning rate and start. Scored on held-out prompts, with the private model
as ground truth (scoring only): mean KL(private || distilled) of the next-token distribution
along the private model's greedy continuation, and greedy agreement (the same most likely
token), against the number of queries; 0 queries is the base's own tail.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tdllm.engine import Engine, SamplingParams
from tdllm.engine.sampling import TokenLogprobs
from tdllm.errors import UsageError
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.loader import load_model
from tdllm.model.tokenizer import Tokenizer
from tdllm.model.transformer import Transformer
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.public_reference import PublicReference
from tdllm.trusted.split import offload_public_prefix
from tdllm_lab.attacks.result import AttackOptions, AttackResult
from tdllm_lab.protection.finetune import (
    Example,
    chat_prompt,
    prefix_states,
    tail_hidden,
    untie_and_partition,
)

TEXT = "text"


@dataclass(frozen=True)
class Plan:
    """How much the attacker asks and trains: the same for both attackers."""

    budgets: tuple[int, ...]  # numbers of queries, each a prompt and `new_tokens` sampled
    new_tokens: int = 32
    top: int = 5  # the N of top-N logprobs (the policy "top-k:5")
    epochs: int = 4  # passes over the queries' answers ...
    min_steps: int = 8  # ... but at least this many optimizer steps
    batch: int = 8  # answers per step
    lr: float = 5e-4

    def steps(self, queries: int) -> int:
        return max(self.min_steps, math.ceil(self.epochs * queries / self.batch))


FULL = Plan((8, 32, 128))
QUICK = Plan((8, 32), new_tokens=16)


@dataclass
class Answer:
    """What the API returned for one query: the sampled tokens and, per token, its logprobs."""

    prompt: list[int]
    tokens: list[int]
    logprobs: list[TokenLogprobs]

    def example(self) -> Example:
        return Example(self.prompt + self.tokens, len(self.prompt))


@dataclass(frozen=True)
class Score:
    kl: float  # mean KL(private || distilled) per held-out position, nats
    agreement: float  # fraction of held-out positions where the most likely tokens agree

    def to_json(self) -> dict[str, float]:
        return {"kl": self.kl, "agreement": self.agreement}


@contextmanager
def served_split(
    private: Checkpoint, base: Checkpoint, k: int, device: str, max_batch: int, max_seq: int
) -> Iterator[Engine]:
    """The engine the API runs for `private` under `split`: the prefix, checked against the
    public `base`, on `device`; the tail in the TD."""
    crossing = Crossing.open(device)
    try:
        model, _ = load_model(private, torch.float32)
        reference = PublicReference.build(base.name, ((n, t.float()) for n, t in base.tensors()))
        placement = offload_public_prefix(
            model, private, reference, crossing, k, max_batch, max_seq, 0.0
        )
        model.place(placement)
        tokenizer = private.tokenizer or _NoTokenizer()
        yield Engine(model, tokenizer, max_batch=max_batch, max_seq_len=max_seq)  # type: ignore[arg-type]
    finally:
        crossing.close()


class _NoTokenizer:
    """For checkpoints without one (tiny test models): no stop tokens, no text."""

    stop_token_ids: frozenset[int] = frozenset()

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return ""


def ask(
    engine: Engine, prompts: Sequence[list[int]], new_tokens: int, top: int, seed: int
) -> list[Answer]:
    """Each prompt once, sampled at temperature 1 with top-`top` logprobs (query i: seed + i)."""
    params = [
        SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=seed + i, logprobs=top)
        for i in range(len(prompts))
    ]
    done = engine.generate(prompts, params)
    return [
        Answer(list(p), c.token_ids, c.logprobs or []) for p, c in zip(prompts, done, strict=True)
    ]


def greedy(engine: Engine, prompts: Sequence[list[int]], new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    return [c.token_ids for c in engine.generate(prompts, params)]


def text_loss(log_q: torch.Tensor, answer: Answer) -> torch.Tensor:
    """Cross-entropy of the sampled tokens."""
    return F.nll_loss(log_q, torch.tensor(answer.tokens))


def logprobs_loss(log_q: torch.Tensor, answer: Answer) -> torch.Tensor:
    """Cross-entropy against what the logprobs say: the probability of each returned token
    (the top N and the chosen one), the rest of the mass on one bucket of every other token."""
    target = torch.zeros_like(log_q)
    for t, entry in enumerate(answer.logprobs):
        for token, logprob in ((entry.token_id, entry.logprob), *entry.top):
            target[t, token] = math.exp(logprob)
    known = target > 0
    rest = (1 - target.sum(-1)).clamp(min=0)
    log_rest = torch.logsumexp(log_q.masked_fill(known, -math.inf), dim=-1)
    per_position = -(target * log_q).sum(-1) - rest * log_rest
    return per_position.mean()


class Scorer:
    """Held-out examples, their prefix states and the private model's distributions there
    (kept as final hidden states and the head: a few floats a position, not a vocabulary)."""

    def __init__(
        self, attacker: Transformer, private: Transformer, examples: list[Example], k: int
    ) -> None:
        self.examples, self.k = examples, k
        self.states = prefix_states(attacker, examples, k)  # the prefix is the base's: public
        with torch.no_grad():
            self.truth = [
                tail_hidden(private, s, e, k) for s, e in zip(self.states, examples, strict=True)
            ]
        self.head = private.lm_head

    @torch.no_grad()
    def score(self, model: Transformer) -> Score:
        kl, agree, positions = 0.0, 0, 0
        for state, ex, hidden in zip(self.states, self.examples, self.truth, strict=True):
            log_p = F.log_softmax(self.head(hidden).float(), dim=-1)
            log_q = F.log_softmax(model.lm_head(tail_hidden(model, state, ex, self.k)).float(), -1)
            kl += float((log_p.exp() * (log_p - log_q)).sum())
            agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
            positions += log_p.shape[0]
        return Score(kl / positions, agree / positions)


class Attacker:
    """The base model with a trainable tail, reset to the base's before each distillation."""

    def __init__(self, base: Checkpoint, k: int) -> None:
        self.model, _ = load_model(base, torch.float32)
        self.k = k
        self.params = untie_and_partition(self.model, k)
        self.start = [p.detach().clone() for p in self.params]

    def reset(self) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, self.start, strict=True):
                p.copy_(s)

    def states(self, answers: Sequence[Answer]) -> list[torch.Tensor]:
        """The prefix's hidden states for each answer (public computation, done once)."""
        return prefix_states(self.model, [a.example() for a in answers], self.k)

    def distil(
        self,
        answers: Sequence[Answer],
        states: Sequence[torch.Tensor],
        mode: str,
        plan: Plan,
        seed: int,
    ) -> None:
        """Train the tail from the base's on `answers`: `mode` TEXT, or their logprobs."""
        self.reset()
        examples = [a.example() for a in answers]
        optimizer = torch.optim.AdamW(self.params, lr=plan.lr, weight_decay=0.0)
        order = _batches(len(answers), plan.batch, plan.steps(len(answers)), seed)
        loss_of = text_loss if mode == TEXT else logprobs_loss
        for batch in order:
            optimizer.zero_grad(set_to_none=True)
            for i in batch:
                hidden = tail_hidden(self.model, states[i], examples[i], self.k)
                log_q = F.log_softmax(self.model.lm_head(hidden).float(), dim=-1)
                (loss_of(log_q, answers[i]) / len(batch)).backward()
            optimizer.step()


def _batches(n: int, size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of `size` indexes below `n`, epoch after epoch, each epoch shuffled."""
    g = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    pool: list[int] = []
    while len(out) < steps:
        batch: list[int] = []
        while len(batch) < min(size, n):
            if not pool:
                pool = torch.randperm(n, generator=g).tolist()
            batch.append(pool.pop())
        out.append(batch)
    return out


def measure(
    private: Checkpoint,
    base: Checkpoint,
    queries: Sequence[list[int]],
    held_out: Sequence[list[int]],
    plan: Plan,
    options: AttackOptions,
) -> dict[str, Any]:
    """Serve `private` under split, ask it the first max(budgets) `queries`, and distil a tail
    from the first N answers for each budget N, once from text and once from logprobs; scored
    on `held_out` prompts."""
    most = max(plan.budgets)
    if len(queries) < most:
        raise ValueError(f"{most} queries need as many prompts; {len(queries)} given")
    longest = max(len(p) for p in [*queries[:most], *held_out])
    max_seq = longest + plan.new_tokens + 1
    started = time.perf_counter()
    with served_split(private, base, options.k, options.device, 8, max_seq) as engine:
        answers = ask(engine, queries[:most], plan.new_tokens, plan.top, options.seed)
        continuations = greedy(engine, held_out, plan.new_tokens)
    served = time.perf_counter() - started
    attacker = Attacker(base, options.k)
    truth, _ = load_model(private, torch.float32)
    examples = [Example(p + c, len(p)) for p, c in zip(held_out, continuations, strict=True)]
    scorer = Scorer(attacker.model, truth, examples, options.k)
    del truth
    modes = (TEXT, f"top-{plan.top}")
    curves: dict[str, dict[int, dict[str, float]]] = {mode: {} for mode in modes}
    states = attacker.states(answers)
    for n in plan.budgets:
        for mode in modes:
            attacker.distil(answers[:n], states[:n], mode, plan, options.seed)
            curves[mode][n] = scorer.score(attacker.model).to_json()
    attacker.reset()
    return {
        "base": scorer.score(attacker.model).to_json(),
        "curves": curves,
        "new_tokens": plan.new_tokens,
        "top": plan.top,
        "held_out_prompts": len(held_out),
        "held_out_positions": sum(len(e.tokens) - e.answer_start for e in examples),
        "query_tokens": sum(len(a.tokens) for a in answers),
        "serving_seconds": round(served, 1),
    }


def query_prompts(tokenizer: Tokenizer, seed: int) -> list[list[int]]:
    """The attacker's prompts: public, general (they do not know the private facts), the
    training halves of general_data (chat questions, and the first 24 tokens of each prose
    paragraph), in a fixed shuffled order."""
    from tdllm_lab.protection.general_data import paragraphs, train_chat, train_text

    prompts = [chat_prompt(tokenizer, q) for q, _ in train_chat()]
    prompts += [tokenizer.encode(p)[:24] for p in paragraphs(train_text())]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
    return [prompts[i] for i in order.tolist()]


def held_out_prompts(tokenizer: Tokenizer) -> list[list[int]]:
    from tdllm_lab.protection.general_data import HELD_OUT_PROMPTS

    return [
        chat_prompt(tokenizer, p.text) if p.kind == "chat" else tokenizer.encode(p.text)
        for p in HELD_OUT_PROMPTS
    ]


def run(options: AttackOptions) -> AttackResult:
    if options.profile != "split":
        raise UsageError("A15 distils the private tail that split keeps in the TD")
    from tdllm_lab.attacks.device_view import base_checkpoint, private_checkpoint

    plan = QUICK if options.quick else FULL
    base = base_checkpoint()
    private = private_checkpoint(options, base)
    tokenizer = private.tokenizer or base.tokenizer
    if tokenizer is None:
        raise UsageError("A15 needs the model's tokenizer for its prompts")
    started = time.perf_counter()
    detail = measure(
        private, base, query_prompts(tokenizer, options.seed), held_out_prompts(tokenizer), plan,
        options,
    )  # fmt: skip
    most = max(plan.budgets)
    value = detail["curves"][f"top-{plan.top}"][most]["kl"]
    detail |= {
        "model": private.name,
        "claim": "split does not claim to stop an API user distilling the tail (design L9): "
        "logprobs_policy decides how much each answer gives away",
        "seconds": round(time.perf_counter() - started, 1),
    }
    return AttackResult(
        "A15",
        options.profile,
        f"KL(private || distilled) on held-out prompts after {most} queries with top-{plan.top} "
        "logprobs",
        value,
        False,
        detail,
    )
