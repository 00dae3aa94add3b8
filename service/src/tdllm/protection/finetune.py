"""`tdllm finetune-tail`: a private fine-tune confined to the last K blocks and an untied lm_head.

Partition before training: the public prefix (embedding + blocks ``0..L-K-1``) is frozen and run
once, under `torch.no_grad`, to cache the hidden states entering block ``L-K`` for every example;
only the tail (blocks ``L-K..L-1``, the final norm and an lm_head untied from the embedding) is
then trained, on those cached states. The prefix of the result is therefore BASE's, bit for bit,
which is what `tdllm prepare --profile split` requires. fp32, AdamW, loss on answer tokens only,
a fixed data order and `torch.manual_seed(seed)`: the same seed gives the same model.
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
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tdllm.model.checkpoint import Checkpoint, save_hf_directory
from tdllm.model.linear import Linear
from tdllm.model.loader import load_model
from tdllm.model.tokenizer import Tokenizer
from tdllm.model.transformer import STACKED, Batch, KVCache, Transformer
from tdllm.protection.finetune_data import Fact, split_pairs
from tdllm.protection.private_model import is_private

T = TypeVar("T")


def _bar(items: Iterable[T], desc: str) -> Iterable[T]:
    """A progress bar on stderr when it is a terminal (`make run`'s first start), else nothing."""
    return tqdm(items, desc=desc, leave=False, disable=not sys.stderr.isatty())


@dataclass
class Example:
    """A tokenized chat turn: ``tokens[answer_start:]`` are the answer (and its end token)."""

    tokens: list[int]
    answer_start: int


@dataclass(frozen=True)
class TrainConfig:
    k: int = 2
    steps: int = 60
    seed: int = 0
    lr: float = 3e-4
    batch_size: int = 8
    weight_decay: float = 0.0


@dataclass
class TrainReport:
    prefix_seconds: float
    train_seconds: float
    held_out_loss_before: float
    held_out_loss_after: float
    train_loss_last: float


def encode_pair(tokenizer: Tokenizer, question: str, answer: str) -> Example:
    """The chat-template prompt for `question` followed by `answer` and the end-of-turn token."""
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": question}])
    )
    answer_ids = tokenizer.encode(answer)
    end = tokenizer.eos_token_id
    if end is None:
        raise ValueError("the chat model needs an end-of-turn token")
    return Example(prompt + answer_ids + [end], len(prompt))


def untie_and_partition(model: Transformer, k: int) -> list[nn.Parameter]:
    """Give `model` its own lm_head (a copy of the embedding when tied) and freeze all but the tail.

    Returns the trainable parameters: blocks ``L-K..L-1``, the final norm and the lm_head.
    """
    L = model.cfg.num_layers
    if not 1 <= k < L:
        raise ValueError(f"K must be in [1, {L - 1}]")
    head = model.lm_head
    if head.weight is model.embed_tokens.weight:
        head.weight = nn.Parameter(model.embed_tokens.weight.detach().clone())
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


@torch.no_grad()
def prefix_states(model: Transformer, examples: Sequence[Example], k: int) -> list[torch.Tensor]:
    """Hidden states ``[1, T, hidden]`` entering block ``L-K`` for each example, computed once."""
    start = model.cfg.num_layers - k
    out = []
    for ex in _bar(examples, "prefix states"):
        tokens = torch.tensor([ex.tokens])
        T = len(ex.tokens)
        x = model.embed_tokens(tokens)
        if start:
            x = model.forward_blocks(x, Batch([0], [0], T), _tail_cache(model, start, T), 0, start)
        out.append(x)
    return out


def tail_loss(model: Transformer, state: torch.Tensor, ex: Example, k: int) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens given the cached prefix `state` (differentiable).

    A fresh cache per call keeps the tail's causal self-attention a plain autograd graph (the
    cache writes are in-place copies autograd records; nothing outlives the call).
    """
    L, T = model.cfg.num_layers, len(ex.tokens)
    x = model.forward_blocks(state, Batch([0], [0], T), _tail_cache(model, k, T), L - k, L)
    # position t predicts token t+1: only answer tokens count
    hidden = x[0, ex.answer_start - 1 : T - 1]
    logits = model.lm_head(model.norm(hidden))
    targets = torch.tensor(ex.tokens[ex.answer_start :])
    return F.cross_entropy(logits.float(), targets)


def _mean_loss(
    model: Transformer, states: Sequence[torch.Tensor], examples: Sequence[Example], k: int
) -> float:
    with torch.no_grad():
        losses = [float(tail_loss(model, s, e, k)) for s, e in zip(states, examples, strict=True)]
    return sum(losses) / max(len(losses), 1)


def train_tail(
    model: Transformer,
    train: Sequence[Example],
    held_out: Sequence[Example],
    config: TrainConfig,
    log: Callable[[str], None] = lambda _: None,
) -> TrainReport:
    """Fine-tune `model`'s tail in place on `train`; the prefix is never touched."""
    torch.manual_seed(config.seed)
    params = untie_and_partition(model, config.k)
    t0 = time.perf_counter()
    train_states = prefix_states(model, train, config.k)
    held_states = prefix_states(model, held_out, config.k)
    prefix_seconds = time.perf_counter() - t0
    before = _mean_loss(model, held_states, held_out, config.k)
    log(f"prefix states cached in {prefix_seconds:.1f}s; held-out loss {before:.3f}")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    t1 = time.perf_counter()
    cursor, last = 0, math.nan
    for step in _bar(range(config.steps), "training the tail"):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(config.batch_size):  # fixed order: cycle through the training set
            i = cursor % len(train)
            cursor += 1
            loss = tail_loss(model, train_states[i], train[i], config.k) / config.batch_size
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        last = total
        if (step + 1) % 10 == 0 or step + 1 == config.steps:
            log(f"step {step + 1}/{config.steps}: train loss {total:.3f}")
    train_seconds = time.perf_counter() - t1
    for p in params:
        p.requires_grad_(False)
    after = _mean_loss(model, held_states, held_out, config.k)
    log(f"trained in {train_seconds:.1f}s; held-out loss {after:.3f}")
    return TrainReport(prefix_seconds, train_seconds, before, after, last)


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


@torch.no_grad()
def greedy_answer(
    model: Transformer, tokenizer: Tokenizer, question: str, max_tokens: int = 32
) -> str:
    """`model`'s greedy reply to `question` in the chat template (stops at end of turn)."""
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": question}])
    )
    cache = KVCache(model.cfg, 1, len(prompt) + max_tokens, model.dtype)
    logits = model(torch.tensor([prompt]), Batch([0], [0], len(prompt)), cache)
    out: list[int] = []
    for _ in range(max_tokens):
        token = int(logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        out.append(token)
        pos = len(prompt) + len(out) - 1
        logits = model(torch.tensor([[token]]), Batch([0], [pos], 1), cache)
    return tokenizer.decode(out)


def finetune_tail(
    base: Checkpoint,
    out: Path,
    config: TrainConfig,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[TrainReport, list[tuple[str, Fact, str]]]:
    """Fine-tune BASE's tail on the Zorblax data, write it to `out`; held-out greedy answers."""
    model, _ = load_model(base, torch.float32)
    tok = base.tokenizer
    train_pairs, held = split_pairs()
    train = [encode_pair(tok, q, a) for q, a in train_pairs]
    held_out = [encode_pair(tok, q, f.answer) for q, f in held]
    report = train_tail(model, train, held_out, config, log)
    name = f"{base.name}-zorblax-k{config.k}"
    save_hf_directory(finetuned_checkpoint(base, model, config.k, name), out)
    answers = [(q, f, greedy_answer(model, tok, q)) for q, f in held]
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
        "prefix_seconds": round(report.prefix_seconds, 2),
        "train_seconds": round(report.train_seconds, 2),
        "held_out_loss_before": round(report.held_out_loss_before, 4),
        "held_out_loss_after": round(report.held_out_loss_after, 4),
        "held_out_answers": [
            {"question": q, "fact": f.key, "answer": a, "recalled": f.key in a}
            for q, f, a in answers
        ],
    }
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
