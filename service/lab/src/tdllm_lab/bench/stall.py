"""`tdllm bench stall`: what a long prompt arriving does to a stream already decoding (issue 15).

One stream decodes; a long prompt arrives; both run in one engine (two slots) until the long
prompt has its first token and a few more steps. For each prefill budget (`prefill_chunk`; 0 is
whole-prompt prefill) the report gives the running stream's largest inter-token gap (its stall),
its median gap before the prompt arrived, and the long prompt's time to first token. Every
budget runs on the same loaded model, after one warm-up of the whole prefill; the budgets take
turns `repeats` times and each figure is the best of its budget's runs.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.loader import load_model
from tdllm_lab.bench.decode_profile import kernel_table

STREAM_PROMPT = 32
WARM_STEPS = 8  # stream tokens before the long prompt arrives (their gaps: the baseline)
AFTER_STEPS = 4  # steps after the long prompt's first token (both decoding)


def run_stall(
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    budgets: list[int],
    prompt_tokens: int,
    repeats: int,
    status: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    model, _ = load_model(checkpoint, dtype, kernel_table("served"))
    vocab = checkpoint.config.vocab_size
    long_prompt = [(j * 7919 + 100) % vocab for j in range(prompt_tokens)]
    stream_prompt = [(j * 31 + 7) % vocab for j in range(STREAM_PROMPT)]
    max_seq = prompt_tokens + 64
    status(f"stall: warm-up, one {prompt_tokens}-token prefill")
    warm = Engine(model, checkpoint.tokenizer, 2, max_seq)
    warm.generate([long_prompt], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    by_budget: dict[int, list[dict[str, Any]]] = {b: [] for b in budgets}
    for attempt in range(repeats):  # budgets interleaved: a noisy minute hits them all alike
        for budget in budgets:
            status(f"stall: prefill_chunk {budget or 'off'}, run {attempt + 1}/{repeats}")
            engine = Engine(model, checkpoint.tokenizer, 2, max_seq, prefill_chunk=budget)
            by_budget[budget].append(_one_run(engine, stream_prompt, long_prompt))
    rows = []
    for budget, runs in by_budget.items():
        rows.append(
            {
                "prefill_chunk": budget,
                "stream_max_gap_ms": min(r["max_gap_ms"] for r in runs),
                "stream_median_gap_before_ms": min(r["baseline_ms"] for r in runs),
                "long_prompt_ttft_ms": min(r["ttft_ms"] for r in runs),
                "steps_to_first_token": runs[0]["steps"],
                "runs": runs,  # every run's figures: how noisy the machine was
            }
        )
    return {
        "model": checkpoint.name,
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": prompt_tokens,
        "stream_prompt_tokens": STREAM_PROMPT,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "rows": rows,
    }


def _one_run(engine: Engine, stream_prompt: list[int], long_prompt: list[int]) -> dict[str, Any]:
    params = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)
    stream = engine.submit(stream_prompt, params)
    stamps: list[float] = []

    def step() -> list[int]:
        outputs = engine.step()
        now = time.perf_counter()
        ids = [o.request_id for o in outputs]
        if stream in ids:
            stamps.append(now)
        return ids

    while len(stamps) < WARM_STEPS + 1:
        step()
    baseline = statistics.median(b - a for a, b in itertools.pairwise(stamps))
    arrived_at = len(stamps) - 1
    long = engine.submit(long_prompt, SamplingParams(max_tokens=64, ignore_eos=True))
    submitted = time.perf_counter()
    steps = 0
    while True:
        steps += 1
        if long in step():
            ttft = time.perf_counter() - submitted
            break
    for _ in range(AFTER_STEPS):
        step()
    engine.cancel(long)
    engine.cancel(stream)
    window = stamps[arrived_at:]
    gaps = [b - a for a, b in itertools.pairwise(window)]
    return {
        "max_gap_ms": round(1000 * max(gaps), 1),
        "baseline_ms": round(1000 * baseline, 1),
        "ttft_ms": round(1000 * ttft, 1),
        "steps": steps,
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']} {report['dtype']}, {report['threads']} threads: one stream decoding "
        f"while a {report['prompt_tokens']}-token prompt arrives (best of {report['repeats']})",
        f"{'prefill_chunk':>13}  {'stream max gap':>14}  {'gap before':>10}  "
        f"{'long TTFT':>9}  {'steps':>5}",
    ]
    for r in report["rows"]:
        budget = r["prefill_chunk"] or "off"
        lines.append(
            f"{budget:>13}  {r['stream_max_gap_ms']:>11.1f} ms  "
            f"{r['stream_median_gap_before_ms']:>7.1f} ms  {r['long_prompt_ttft_ms']:>6.0f} ms  "
            f"{r['steps_to_first_token']:>5}"
        )
    return "\n".join(lines)
