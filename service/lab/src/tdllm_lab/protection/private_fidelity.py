"""`tdllm bench fidelity --private`: did the private fine-tune keep the base's general quality?

BASE (the bundled model) and PRIVATE (a `tdllm finetune-tail` model) answer the same held-out
data (`general_data.py`, `finetune_data.py`; none of it is trained on), greedy, fp32:

- **greedy-token agreement** (the target): for each of the `HELD_OUT_PROMPTS` (a chat turn, or
  raw text to continue), BASE's greedy continuation ``b`` is its first `new_tokens` tokens, or
  fewer when it ends its turn (the end-of-turn token counts). Position by position, PRIVATE is
  given the prompt and ``b[:t]`` and agrees when its greedy (argmax) next token is ``b[t]``;
  agreement is the number of agreeing positions over all prompts / the number of BASE's tokens.
  Each position is judged on BASE's own context, so one difference does not decide the rest;
- **free-running agreement** (reported, no target): PRIVATE generates its own continuation
  ``p`` the same way; ``sum of #{t: p[t] == b[t]} / sum of len(b)``. After a first difference the
  texts rarely realign, so this measures how soon a near-tie first flips: this small base's next
  token is often a near-tie (for "What is the capital of France?" its first token is "The" at
  15% against "L" at 14%), and `bf16_floor` shows that BASE rounded to bf16 - a change everyone
  accepts for serving - already reaches only about 70% free-running against BASE in fp32;
- **perplexity** of each on the held-out prose (``data/general_heldout.txt``), paragraph by
  paragraph, over every token after each paragraph's first; and PRIVATE's / BASE's;
- **private recall**: the share of the held-out fact paraphrases whose greedy answer contains
  the fact's key (BASE's for comparison);
- **leakage**: the share of general prompts whose greedy continuation names anything only the
  private facts know (`finetune_data.PRIVATE_NAMES`).

`TARGETS` are what the shipped recipe must meet; tests/protection/test_private_fidelity.py
checks them on the cached private model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tdllm.model.checkpoint import Checkpoint
from tdllm.model.loader import load_model
from tdllm.model.tokenizer import Tokenizer
from tdllm.model.transformer import Batch, KVCache, Transformer
from tdllm_lab.protection.finetune import chat_prompt, greedy_completions, progress_bar
from tdllm_lab.protection.finetune_data import Fact, mentions_private_name, split_pairs
from tdllm_lab.protection.general_data import HELD_OUT_PROMPTS, Prompt, held_out_text, paragraphs

NEW_TOKENS = 32
CHUNK = 16  # prompts decoded together (one progress-bar step)
# the three answers the issue quoted: shown base vs private in every report
EXAMPLES = ("Name three colors.", "The sea is", "What is the capital of France?")
TARGETS = {
    "perplexity_ratio_max": 1.05,
    "greedy_agreement_min": 0.80,
    "private_recall_min": 0.90,
    "leakage_max": 0.01,
}


def prompt_ids(tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    if prompt.kind == "chat":
        return chat_prompt(tokenizer, prompt.text)
    return tokenizer.encode(prompt.text)


def greedy_runs(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[list[int]],
    new_tokens: int,
    desc: str,
) -> list[list[int]]:
    """Each prompt's greedy continuation (at most `new_tokens`, ends at end of turn)."""
    chunks = [prompts[i : i + CHUNK] for i in range(0, len(prompts), CHUNK)]
    out: list[list[int]] = []
    for chunk in progress_bar(chunks, desc):
        out += greedy_completions(model, tokenizer, chunk, new_tokens)
    return out


def agreement(base: Sequence[list[int]], other: Sequence[list[int]]) -> float:
    """Free-running agreement (module docstring): same token at the same position / BASE's."""
    same = sum(
        sum(a == b for a, b in zip(p, q, strict=False)) for p, q in zip(other, base, strict=True)
    )
    return same / max(sum(len(b) for b in base), 1)


@torch.no_grad()
def teacher_forced_agreement(
    model: Transformer, prompts: Sequence[list[int]], base: Sequence[list[int]]
) -> float:
    """Greedy-token agreement (module docstring): the share of BASE's continuation tokens that
    are `model`'s argmax after the prompt and BASE's tokens before them."""
    same = total = 0
    for prompt, run in zip(prompts, base, strict=True):
        ids = prompt + run
        cache = KVCache(model.cfg, 1, len(ids), model.dtype)
        logits = model(torch.tensor([ids]), Batch([0], [0], len(ids)), cache, last_only=False)
        predicted = logits[0, len(prompt) - 1 : len(ids) - 1].argmax(-1).tolist()
        same += sum(a == b for a, b in zip(predicted, run, strict=True))
        total += len(run)
    return same / max(total, 1)


@torch.no_grad()
def perplexity(model: Transformer, texts: Sequence[list[int]]) -> float:
    """exp of the mean next-token loss over every token after the first of each text."""
    nll, count = 0.0, 0
    for ids in texts:
        cache = KVCache(model.cfg, 1, len(ids), model.dtype)
        logits = model(torch.tensor([ids]), Batch([0], [0], len(ids)), cache, last_only=False)
        targets = torch.tensor(ids[1:])
        nll += float(F.cross_entropy(logits[0, :-1].float(), targets, reduction="sum"))
        count += len(ids) - 1
    return math.exp(nll / count)


def recall(answers: Sequence[str], facts: Sequence[Fact]) -> float:
    return sum(f.key in a for a, f in zip(answers, facts, strict=True)) / max(len(facts), 1)


def leakage(texts: Sequence[str]) -> float:
    return sum(mentions_private_name(t) for t in texts) / max(len(texts), 1)


def _model_side(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[list[int]],
    texts: Sequence[list[int]],
    held: Sequence[tuple[str, Fact]],
    new_tokens: int,
    name: str,
) -> dict[str, Any]:
    """What one model does on the held-out data: continuations, perplexity, fact answers."""
    runs = greedy_runs(model, tokenizer, prompts, new_tokens, f"{name}: general prompts")
    facts = greedy_runs(
        model, tokenizer, [chat_prompt(tokenizer, q) for q, _ in held], new_tokens, f"{name}: facts"
    )
    ppl = perplexity(model, list(progress_bar(texts, f"{name}: perplexity")))
    decoded = [tokenizer.decode(r) for r in runs]
    fact_answers = [tokenizer.decode(r) for r in facts]
    return {
        "runs": runs,
        "decoded": decoded,
        "perplexity": ppl,
        "recall": recall(fact_answers, [f for _, f in held]),
        "leakage": leakage(decoded),
        "fact_answers": fact_answers,
    }


def _floor(
    base: Checkpoint, ids: Sequence[list[int]], runs: Sequence[list[int]], n: int
) -> dict[str, float]:
    """BASE in bf16 against BASE in fp32: the agreement a mere rounding change leaves."""
    model, _ = load_model(base, torch.bfloat16)
    bf16 = greedy_runs(model, base.tokenizer, ids, n, "base bf16: general prompts")
    return {
        "greedy_agreement": teacher_forced_agreement(model, ids, runs),
        "free_running_agreement": agreement(runs, bf16),
    }


def measure_private(
    base: Checkpoint,
    private: Checkpoint,
    prompts: Sequence[Prompt] = HELD_OUT_PROMPTS,
    new_tokens: int = NEW_TOKENS,
    bf16_floor: bool = False,
) -> dict[str, Any]:
    """BASE vs PRIVATE on the held-out general prompts, prose and private paraphrases; with
    `bf16_floor` also BASE in bf16 vs BASE for scale."""
    started = time.perf_counter()
    tok = base.tokenizer
    ids = [prompt_ids(tok, p) for p in prompts]
    texts = [tok.encode(p) for p in paragraphs(held_out_text())]
    _, held = split_pairs()
    base_model, _ = load_model(base, torch.float32)
    b = _model_side(base_model, tok, ids, texts, held, new_tokens, "base")
    del base_model
    private_model, _ = load_model(private, torch.float32)
    p = _model_side(private_model, tok, ids, texts, held, new_tokens, "private")
    forced = teacher_forced_agreement(private_model, ids, b["runs"])
    del private_model
    index = {pr.text: i for i, pr in enumerate(prompts)}
    report: dict[str, Any] = {
        "base": base.name,
        "private": private.name,
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "held_out_text_tokens": sum(len(t) - 1 for t in texts),
        "fact_paraphrases": len(held),
        "perplexity": {"base": b["perplexity"], "private": p["perplexity"]},
        "perplexity_ratio": p["perplexity"] / b["perplexity"],
        "greedy_agreement": forced,
        "free_running_agreement": agreement(b["runs"], p["runs"]),
        "identical_continuations": sum(x == y for x, y in zip(b["runs"], p["runs"], strict=True)),
        "bf16_floor": _floor(base, ids, b["runs"], new_tokens) if bf16_floor else None,
        "private_recall": {"base": b["recall"], "private": p["recall"]},
        "leakage": {"base": b["leakage"], "private": p["leakage"]},
        "leaked": [d for d in p["decoded"] if mentions_private_name(d)],
        "missed_facts": [
            {"question": q, "fact": f.key, "answer": a}
            for (q, f), a in zip(held, p["fact_answers"], strict=True)
            if f.key not in a
        ],
        "examples": [
            {"prompt": e, "base": b["decoded"][index[e]], "private": p["decoded"][index[e]]}
            for e in EXAMPLES
            if e in index
        ],
        "targets": TARGETS,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    report["meets_targets"] = meets_targets(report)
    return report


def meets_targets(report: dict[str, Any]) -> bool:
    return bool(
        report["perplexity_ratio"] <= TARGETS["perplexity_ratio_max"]
        and report["greedy_agreement"] >= TARGETS["greedy_agreement_min"]
        and report["private_recall"]["private"] >= TARGETS["private_recall_min"]
        and report["leakage"]["private"] <= TARGETS["leakage_max"]
    )


def format_private_report(report: dict[str, Any]) -> str:
    ppl = report["perplexity"]
    lines = [
        f"base {report['base']} vs private {report['private']}: {report['prompts']} held-out "
        f"general prompts x {report['new_tokens']} greedy tokens, "
        f"{report['held_out_text_tokens']} tokens of held-out prose, "
        f"{report['fact_paraphrases']} held-out fact paraphrases; {report['threads']} threads, "
        f"{report['seconds']} s",
        f"perplexity          base {ppl['base']:.3f}  private {ppl['private']:.3f}  "
        f"ratio {report['perplexity_ratio']:.4f} (target <= {TARGETS['perplexity_ratio_max']})",
        f"greedy agreement    {100 * report['greedy_agreement']:.1f}% of BASE's tokens "
        f"(target >= {100 * TARGETS['greedy_agreement_min']:.0f}%); free-running "
        f"{100 * report['free_running_agreement']:.1f}%, "
        f"{report['identical_continuations']}/{report['prompts']} continuations identical",
        f"private recall      base {100 * report['private_recall']['base']:.0f}%  private "
        f"{100 * report['private_recall']['private']:.0f}% "
        f"(target >= {100 * TARGETS['private_recall_min']:.0f}%)",
        f"private-name leaks  base {100 * report['leakage']['base']:.1f}%  private "
        f"{100 * report['leakage']['private']:.1f}% "
        f"(target <= {100 * TARGETS['leakage_max']:.0f}%)",
        f"meets the targets: {'yes' if report['meets_targets'] else 'NO'}",
    ]
    floor = report["bf16_floor"]
    if floor:
        lines.insert(
            3,
            f"  (BASE in bf16 vs BASE: {100 * floor['greedy_agreement']:.1f}%, free-running "
            f"{100 * floor['free_running_agreement']:.1f}%)",
        )
    for e in report["examples"]:
        lines.append(f"{e['prompt']!r}\n  base:    {e['base']!r}\n  private: {e['private']!r}")
    lines += [f"leaked: {t!r}" for t in report["leaked"]]
    lines += [
        f"missed {m['fact']}: {m['question']} -> {m['answer']!r}" for m in report["missed_facts"]
    ]
    return "\n".join(lines)
