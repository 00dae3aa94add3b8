"""`tdllm finetune-tail`: a private fine-tune confined to the last K blocks and an untied lm_head.

Partition before training: the public prefix (embedding + blocks ``0..L-K-1``) is frozen and run
once, under `torch.no_grad`, to cache the hidden states entering block ``L-K`` for every example;
only the tail (blocks ``L-K..L-1``, the final norm; an lm_head untied from the embedding) is
then trained, on those cached states. The prefix of the result is therefore BASE's, bit for bit,
which is what `tdllm prepare --profile split` requires.

Recipe ``distill`` (the default; `private_cache.RECIPE_TAG` names it in the cache). Trained on
the facts alone, the tail forgets general ability ("Name three colors." -> "The company colour of
the company colour of ..."). So every step takes 8 private-fact answers (cross-entropy on the
answer tokens) and 8 general sequences (`general_data.py`: chat turns with the base's own greedy
answers, and plain prose), on which the tail's next-token distribution is pulled to the BASE
tail's: 2 x (KL(base || tail) + 2 KL(tail || base)) per position, the first answer position
weighted 4. The reverse KL punishes mass on tokens BASE never says (the private names); the
first token decides the tone of a whole greedy answer. The targets cost one pass: the prefix
states are shared, the untouched tail runs once before training, and its final normed hidden
states are kept (576 floats a position, not 49152 logits); BASE's head turns them into logits
each step. The lm_head is untied but not trained: it stays BASE's (training it too cost half
again as much per step and measured no better); blocks ``L-K..L-1`` and the final norm learn
the facts. 40 steps, AdamW lr 5e-4. Recipe ``lora``, the measured alternative
(docs/performance.md), trains a rank-8 update of every tail projection and the head on the
facts alone and merges it into the weights at the end; it forgets far more. fp32, a fixed data
order and `torch.manual_seed(seed)`: the same seed (and thread count) gives the same model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tdllm.engine import Engine, SamplingParams
from tdllm.model.checkpoint import Checkpoint, save_hf_directory
from tdllm.model.linear import Linear
from tdllm.model.loader import load_model
from tdllm.model.tokenizer import Tokenizer
from tdllm.model.transformer import STACKED, Batch, KVCache, Transformer
from tdllm_lab.protection.finetune_data import Fact, split_pairs
from tdllm_lab.protection.general_data import paragraphs, train_chat, train_text
from tdllm_lab.protection.private_model import is_private

T = TypeVar("T")


def progress_bar(items: Iterable[T], desc: str) -> Iterable[T]:
    """A progress bar on stderr when it is a terminal (`make run`'s first start), else nothing."""
    return tqdm(items, desc=desc, leave=False, disable=not sys.stderr.isatty())


@dataclass
class Example:
    """A tokenized chat turn: ``tokens[answer_start:]`` are the answer (and its end token)."""

    tokens: list[int]
    answer_start: int


Recipe = Literal["distill", "lora"]


@dataclass(frozen=True)
class TrainConfig:
    """The defaults are the ``distill`` recipe, chosen by measurement (docs/performance.md)."""

    k: int = 2
    steps: int = 40
    seed: int = 0
    lr: float = 5e-4
    batch_size: int = 8  # private-fact answers per step
    general_batch: int = 8  # distilled general sequences per step (0: facts only)
    distill_weight: float = 2.0
    reverse_kl: float = 2.0  # KL(tail || base): punishes mass on tokens BASE never says
    first_weight: float = 4.0  # the first predicted token sets the tone of a whole answer
    head_lr_scale: float = 0.0  # 0: the untied head stays BASE's (training it cost time, no gain)
    rank: int = 0  # > 0: train a rank-R update of each tail projection instead of the weights
    weight_decay: float = 0.0


def recipe_config(
    recipe: Recipe, k: int, steps: int, seed: int, lr: float | None = None
) -> TrainConfig:
    """The settings of a named recipe (module docstring); `lr` overrides the recipe's."""
    if recipe == "distill":
        return TrainConfig(k=k, steps=steps, seed=seed, lr=5e-4 if lr is None else lr)
    return TrainConfig(
        k=k, steps=steps, seed=seed, lr=4e-3 if lr is None else lr, general_batch=0, rank=8
    )


@dataclass
class TrainReport:
    prefix_seconds: float
    train_seconds: float
    held_out_loss_before: float
    held_out_loss_after: float
    train_loss_last: float
    distill_kl_last: float = math.nan  # the last step's mean KL(base || tail) per position


def chat_prompt(tokenizer: Tokenizer, question: str) -> list[int]:
    """`question` as a user turn in the chat template, ready for the assistant's reply."""
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]))


def encode_pair(tokenizer: Tokenizer, question: str, answer: str) -> Example:
    """The chat-template prompt for `question` followed by `answer` and the end-of-turn token."""
    prompt = chat_prompt(tokenizer, question)
    answer_ids = tokenizer.encode(answer)
    end = tokenizer.eos_token_id
    if end is None:
        raise ValueError("the chat model needs an end-of-turn token")
    return Example(prompt + answer_ids + [end], len(prompt))


def text_examples(tokenizer: Tokenizer, text: str, window: int = 128) -> list[Example]:
    """Each paragraph of `text` in windows of at most `window` tokens; every token after the
    first is predicted (plain prose, no chat template)."""
    out = []
    for paragraph in paragraphs(text):
        ids = tokenizer.encode(paragraph)
        out += [Example(ids[i : i + window], 1) for i in range(0, len(ids) - 1, window)]
    return [e for e in out if len(e.tokens) > 1]


def general_examples(tokenizer: Tokenizer) -> list[Example]:
    """The general training sequences the ``distill`` recipe distils: `train_chat` turns (the
    answer and end of turn predicted) and the training prose, interleaved in a fixed order."""
    chat = [encode_pair(tokenizer, q, a) for q, a in train_chat()]
    prose = text_examples(tokenizer, train_text())
    # spread the prose evenly among the chat turns, so every step sees a mix
    keyed = [(i / len(chat), 0, e) for i, e in enumerate(chat)]
    keyed += [((i + 0.5) / len(prose), 1, e) for i, e in enumerate(prose)]
    return [e for _, _, e in sorted(keyed, key=lambda t: (t[0], t[1]))]


def untie_and_partition(model: Transformer, k: int) -> list[nn.Parameter]:
    """Give `model` its own lm_head (a copy of the embedding when tied) and freeze all but the tail.

    Returns the trainable parameters: blocks ``L-K..L-1``, the final norm and the lm_head.
    """
    L = model.cfg.num_layers
    if not 1 <= k < L:
        raise ValueError(f"K must be in [1, {L - 1}]")
    head = model.lm_head
    table = model.float_embedding().weight
    if head.weight is table:
        head.weight = nn.Parameter(table.detach().clone())
    model.cfg = dataclasses.replace(model.cfg, tie_word_embeddings=False)
    for p in model.parameters():
        p.requires_grad_(False)
    tail: list[nn.Module] = [*model.layers[L - k :], model.norm, head]
    params = [p for m in tail for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def _tail_cache(model: Transformer, layers: int, seq_len: int) -> KVCache:
    """A one-sequence cache of exactly `layers` layers (`forward_blocks` indexes it from start)."""
    cfg = dataclasses.replace(model.cfg, num_layers=layers)
    return KVCache(cfg, 1, seq_len, model.dtype)


def _shared_length(examples: Sequence[Example]) -> int:
    """Tokens every example starts with (the chat template's system turn), leaving each at least
    one token of its own."""
    if len(examples) < 2:
        return 0
    first, n = examples[0].tokens, min(len(e.tokens) for e in examples) - 1
    for ex in examples[1:]:
        n = next((i for i in range(n) if ex.tokens[i] != first[i]), n)
    return max(n, 0)


@torch.no_grad()
def prefix_states(model: Transformer, examples: Sequence[Example], k: int) -> list[torch.Tensor]:
    """Hidden states ``[1, T, hidden]`` entering block ``L-K`` for each example, computed once.

    The tokens all examples share (the system turn of the chat template, half of a short chat
    example) run through the prefix once; each example continues from a copy of their keys
    and values, as a decode continues from its prompt.
    """
    start = model.cfg.num_layers - k
    if not start:
        return [model.embed_tokens(torch.tensor([ex.tokens])) for ex in examples]
    shared = _shared_length(examples)
    common = _tail_cache(model, start, max(shared, 1))
    head = torch.zeros(1, 0, model.cfg.hidden_size, dtype=model.dtype)
    if shared:
        x = model.embed_tokens(torch.tensor([examples[0].tokens[:shared]]))
        head = model.forward_blocks(x, Batch([0], [0], shared), common, 0, start)
    out = []
    for ex in progress_bar(examples, "prefix states"):
        T = len(ex.tokens)
        cache = _tail_cache(model, start, T)
        for mine, theirs in zip(cache.k + cache.v, common.k + common.v, strict=True):
            mine[:, :, :shared] = theirs[:, :, :shared]
        x = model.embed_tokens(torch.tensor([ex.tokens[shared:]]))
        x = model.forward_blocks(x, Batch([0], [shared], T - shared), cache, 0, start)
        out.append(torch.cat([head, x], dim=1))
    return out


def tail_hidden(model: Transformer, state: torch.Tensor, ex: Example, k: int) -> torch.Tensor:
    """The tail's final normed hidden states ``[n, hidden]`` at the positions that predict
    ``ex.tokens[answer_start:]``, from the cached prefix `state` (differentiable).

    A fresh cache per call keeps the tail's causal self-attention a plain autograd graph (the
    cache writes are in-place copies autograd records; nothing outlives the call).
    """
    L, T = model.cfg.num_layers, len(ex.tokens)
    x = model.forward_blocks(state, Batch([0], [0], T), _tail_cache(model, k, T), L - k, L)
    # position t predicts token t+1
    return model.norm(x[0, ex.answer_start - 1 : T - 1])


def tail_loss(model: Transformer, state: torch.Tensor, ex: Example, k: int) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens given the cached prefix `state`."""
    logits = model.lm_head(tail_hidden(model, state, ex, k))
    targets = torch.tensor(ex.tokens[ex.answer_start :])
    return F.cross_entropy(logits.float(), targets)


def distill_loss(
    model: Transformer,
    state: torch.Tensor,
    ex: Example,
    k: int,
    base_hidden: torch.Tensor,
    base_head: torch.Tensor,
    reverse: float = 0.0,
    first: float = 1.0,
) -> torch.Tensor:
    """Mean KL(base || tail) + `reverse` KL(tail || base) per distilled position, the first
    position weighted `first`; `base_hidden` is the untouched tail's `tail_hidden` there and
    `base_head` the base's lm_head weight."""
    log_q = F.log_softmax(model.lm_head(tail_hidden(model, state, ex, k)).float(), dim=-1)
    with torch.no_grad():
        log_p = F.log_softmax((base_hidden @ base_head.T).float(), dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    if reverse:
        per_position = per_position + reverse * (log_q.exp() * (log_q - log_p)).sum(-1)
    weights = torch.ones_like(per_position)
    weights[0] = first
    return (weights * per_position).sum() / weights.sum()


def _mean_loss(
    model: Transformer, states: Sequence[torch.Tensor], examples: Sequence[Example], k: int
) -> float:
    with torch.no_grad():
        losses = [float(tail_loss(model, s, e, k)) for s, e in zip(states, examples, strict=True)]
    return sum(losses) / max(len(losses), 1)


def _weight(layer: Linear) -> torch.Tensor:
    weight = layer.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{layer.name}: no plain weight to train")
    return weight


class LowRankUpdate:
    """Adds ``x @ (B A).T`` to one `Linear`'s output while training (B starts at zero, so the
    model starts as BASE); `merge` folds ``B A`` into the weight and removes the hook."""

    def __init__(self, layer: Linear, rank: int) -> None:
        self.layer = layer
        self.a = nn.Parameter(torch.randn(rank, layer.in_features) / math.sqrt(layer.in_features))
        self.b = nn.Parameter(torch.zeros(layer.out_features, rank))
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> Any:
        return output + (inputs[0] @ self.a.T) @ self.b.T

    def merge(self) -> None:
        self.handle.remove()
        with torch.no_grad():
            _weight(self.layer).add_(self.b @ self.a)


def low_rank_updates(model: Transformer, k: int, rank: int) -> list[LowRankUpdate]:
    """A `LowRankUpdate` on every projection of the tail blocks and on the lm_head; the
    projections' own weights stop training (the norms still train)."""
    layers = [m for block in model.layers[-k:] for m in block.modules() if isinstance(m, Linear)]
    updates = []
    for layer in [*layers, model.lm_head]:
        _weight(layer).requires_grad_(False)
        updates.append(LowRankUpdate(layer, rank))
    return updates


def _cycle(items: Sequence[T]) -> Iterator[T]:
    """`items` over and over in the given order (a fixed data order keeps runs identical)."""
    while True:
        yield from items


def train_tail(
    model: Transformer,
    train: Sequence[Example],
    held_out: Sequence[Example],
    config: TrainConfig,
    log: Callable[[str], None] = lambda _: None,
    general: Sequence[Example] = (),
) -> TrainReport:
    """Fine-tune `model`'s tail in place on `train` (distilling the base on `general` when
    ``config.general_batch``); the prefix is never touched."""
    torch.manual_seed(config.seed)
    k = config.k
    params = untie_and_partition(model, k)
    base_head = _weight(model.lm_head).detach().clone()  # untied above: still the base's head
    if not config.head_lr_scale:
        _weight(model.lm_head).requires_grad_(False)
    distill = general if config.general_batch else ()
    t0 = time.perf_counter()
    train_states = prefix_states(model, train, k)
    held_states = prefix_states(model, held_out, k)
    general_states = prefix_states(model, distill, k)
    with torch.no_grad():  # the untouched tail's targets, computed once
        targets = [
            tail_hidden(model, s, e, k) for s, e in zip(general_states, distill, strict=True)
        ]
    prefix_seconds = time.perf_counter() - t0
    before = _mean_loss(model, held_states, held_out, k)
    log(f"prefix states cached in {prefix_seconds:.1f}s; held-out loss {before:.3f}")
    updates = low_rank_updates(model, k, config.rank) if config.rank else []
    trainable = [p for p in params if p.requires_grad] + [p for u in updates for p in (u.a, u.b)]
    head = {id(p) for p in model.lm_head.parameters()}
    groups: list[dict[str, Any]] = [
        {"params": [p for p in trainable if id(p) not in head]},
        {"params": [p for p in trainable if id(p) in head], "lr": config.lr * config.head_lr_scale},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    facts = _cycle(list(zip(train_states, train, strict=True)))
    generals = _cycle(list(zip(general_states, distill, targets, strict=True)))
    t1 = time.perf_counter()
    last, last_kl = math.nan, math.nan
    for step in progress_bar(range(config.steps), "training the tail"):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(config.batch_size):
            state, ex = next(facts)
            loss = tail_loss(model, state, ex, k) / config.batch_size
            loss.backward()
            total += float(loss.detach())
        kl = 0.0
        for _ in range(config.general_batch if distill else 0):
            state, ex, target = next(generals)
            loss = distill_loss(
                model, state, ex, k, target, base_head, config.reverse_kl, config.first_weight
            )
            loss = loss / config.general_batch
            (config.distill_weight * loss).backward()
            kl += float(loss.detach())
        optimizer.step()
        last, last_kl = total, (kl if distill else math.nan)
        if (step + 1) % 10 == 0 or step + 1 == config.steps:
            log(f"step {step + 1}/{config.steps}: train loss {total:.3f}, distill KL {kl:.3f}")
    train_seconds = time.perf_counter() - t1
    for update in updates:
        update.merge()
    for p in params:
        p.requires_grad_(False)
    after = _mean_loss(model, held_states, held_out, k)
    log(f"trained in {train_seconds:.1f}s; held-out loss {after:.3f}")
    return TrainReport(prefix_seconds, train_seconds, before, after, last, last_kl)


def tail_tensors(model: Transformer, k: int) -> dict[str, torch.Tensor]:
    """The private tensors of `model`, Hugging Face-named (fused projections split back)."""
    out: dict[str, torch.Tensor] = {}
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        weight = module.weight
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{module.name}: no plain weight to save")
        prefix, _, leaf = module.name.rpartition(".")
        parts = [p for p, (fused, _) in STACKED.items() if fused == leaf]
        if parts:
            for part, chunk in zip(parts, weight.split(module.shard_sizes), strict=True):
                out[f"{prefix}.{part}.weight"] = chunk
        else:
            out[f"{module.name}.weight"] = weight
    for name, param in model.named_parameters():
        if not name.endswith("_proj.weight") and not name.startswith("lm_head."):
            out[f"model.{name}"] = param
    cfg = model.cfg
    return {n: t.detach().float().clone() for n, t in out.items() if is_private(n, cfg, k)}


def finetuned_checkpoint(base: Checkpoint, model: Transformer, k: int, name: str) -> Checkpoint:
    """BASE's prefix tensors as read (bit-identical) plus `model`'s trained tail, untied."""
    cfg = dataclasses.replace(base.config, tie_word_embeddings=False)
    tail = tail_tensors(model, k)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for n, t in base.tensors():
            if not is_private(n, cfg, k):
                yield n, t
        yield from sorted(tail.items())

    return Checkpoint(name, base.path, cfg, base.tokenizer, tensors)


def greedy_completions(
    model: Transformer, tokenizer: Tokenizer, prompts: Sequence[list[int]], max_tokens: int = 32
) -> list[list[int]]:
    """`model`'s greedy continuation of each prompt (token ids, ending with the end-of-turn
    token when it came within `max_tokens`), decoded together in one batch."""
    longest = max(len(p) for p in prompts) + max_tokens + 1
    engine = Engine(model, tokenizer, max_batch=min(len(prompts), 32), max_seq_len=longest)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return [c.token_ids for c in engine.generate(prompts, params)]


def greedy_answers(
    model: Transformer, tokenizer: Tokenizer, questions: Sequence[str], max_tokens: int = 32
) -> list[str]:
    """`model`'s greedy replies to `questions` in the chat template (each stops at end of turn)."""
    prompts = [chat_prompt(tokenizer, q) for q in questions]
    runs = greedy_completions(model, tokenizer, prompts, max_tokens)
    return [tokenizer.decode(ids) for ids in runs]


def greedy_answer(
    model: Transformer, tokenizer: Tokenizer, question: str, max_tokens: int = 32
) -> str:
    return greedy_answers(model, tokenizer, [question], max_tokens)[0]


def finetune_tail(
    base: Checkpoint,
    out: Path,
    config: TrainConfig,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[TrainReport, list[tuple[str, Fact, str]]]:
    """Fine-tune BASE's tail on the Zorblax data (and the general data the recipe distils),
    write it to `out`; held-out greedy answers."""
    model, _ = load_model(base, torch.float32)
    tok = base.tokenizer
    train_pairs, held = split_pairs()
    train = [encode_pair(tok, q, a) for q, a in train_pairs]
    held_out = [encode_pair(tok, q, f.answer) for q, f in held]
    report = train_tail(model, train, held_out, config, log, general_examples(tok))
    name = f"{base.name}-zorblax-k{config.k}"
    save_hf_directory(finetuned_checkpoint(base, model, config.k, name), out)
    replies = greedy_answers(model, tok, [q for q, _ in held])
    answers = [(q, f, a) for (q, f), a in zip(held, replies, strict=True)]
    write_record(out, base.name, config, report, answers)
    return report, answers


RECORD = "finetune.json"


def write_record(
    out: Path,
    base: str,
    config: TrainConfig,
    report: TrainReport,
    answers: Sequence[tuple[str, Fact, str]],
) -> None:
    """``OUT/finetune.json``: how the model was made and how it did (written last)."""
    record = {
        "base": base,
        "k": config.k,
        "steps": config.steps,
        "seed": config.seed,
        "lr": config.lr,
        "recipe": dataclasses.asdict(config),
        "prefix_seconds": round(report.prefix_seconds, 2),
        "train_seconds": round(report.train_seconds, 2),
        "held_out_loss_before": round(report.held_out_loss_before, 4),
        "held_out_loss_after": round(report.held_out_loss_after, 4),
        "distill_kl_last": None
        if math.isnan(report.distill_kl_last)
        else round(report.distill_kl_last, 4),
        "held_out_answers": [
            {"question": q, "fact": f.key, "answer": a, "recalled": f.key in a}
            for q, f, a in answers
        ],
    }
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
