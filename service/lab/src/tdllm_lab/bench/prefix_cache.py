"""`tdllm bench prefix-cache`: time to first token of a request whose system prompt an earlier
request already prefilled, prefix cache off vs on (issue 15, `prefix_cache_blocks`).

Each run builds a fresh engine (so the cache starts empty), runs one request with the shared
system prompt and a user part of its own to completion (it fills the cache when on), then times
the first token of a second request with the same system prompt and another user part. Off and
on take turns `repeats` times on one loaded model; the best and the median of each are reported,
with the prompt tokens the second request prefilled and whether greedy tokens agree.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.loader import load_model
from tdllm_lab.bench.decode_profile import kernel_table

USER_TOKENS = 32
PREFILL_CHUNK = 256  # the service's default


def run_prefix_cache(
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    system_tokens: int,
    blocks: int,
    repeats: int,
    status: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    model, _ = load_model(checkpoint, dtype, kernel_table("served"))
    vocab = checkpoint.config.vocab_size
    system = [(j * 7919 + 100) % vocab for j in range(system_tokens)]

    def user(k: int) -> list[int]:
        return [(j * 31 + 7 + 101 * k) % vocab for j in range(USER_TOKENS)]

    context = system_tokens + USER_TOKENS + 16
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    status("prefix-cache: warm-up")
    Engine(model, checkpoint.tokenizer, 2, context).generate([system + user(0)], greedy)
    ttfts: dict[int, list[float]] = {0: [], blocks: []}
    tokens: dict[int, list[int]] = {}
    for attempt in range(repeats):  # off and on interleaved: a noisy minute hits both alike
        for budget in ttfts:
            status(f"prefix-cache: {budget} blocks, run {attempt + 1}/{repeats}")
            engine = Engine(
                model,
                checkpoint.tokenizer,
                2,
                context,
                prefill_chunk=PREFILL_CHUNK,
                prefix_cache_blocks=budget,
            )
            engine.generate([system + user(2 * attempt + 1)], greedy)
            ttfts[budget].append(_ttft(engine, system + user(2 * attempt + 2)))
            tokens[budget] = engine.generate([system + user(99)], greedy)[0].token_ids
    rows = [
        {
            "prefix_cache_blocks": budget,
            "ttft_best_ms": round(1000 * min(runs), 1),
            "ttft_median_ms": round(1000 * statistics.median(runs), 1),
            "runs_ms": [round(1000 * t, 1) for t in runs],
        }
        for budget, runs in ttfts.items()
    ]
    return {
        "model": checkpoint.name,
        "dtype": str(dtype).removeprefix("torch."),
        "system_tokens": system_tokens,
        "user_tokens": USER_TOKENS,
        "prefill_chunk": PREFILL_CHUNK,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "greedy_tokens_equal": tokens[0] == tokens[blocks],
        "rows": rows,
    }


def _ttft(engine: Engine, prompt: list[int]) -> float:
    started = time.perf_counter()
    engine.submit(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while not engine.step():
        pass
    return time.perf_counter() - started


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']} {report['dtype']}, {report['threads']} threads, "
        f"{report['system_tokens']}-token system prompt + {report['user_tokens']}, "
        f"best of {report['repeats']}; greedy tokens equal: {report['greedy_tokens_equal']}",
        "prefix_cache_blocks  TTFT best  TTFT median",
    ]
    for r in report["rows"]:
        best, median = r["ttft_best_ms"], r["ttft_median_ms"]
        lines.append(f"{r['prefix_cache_blocks']:>19}  {best:>7} ms  {median:>8} ms")
    return "\n".join(lines)
