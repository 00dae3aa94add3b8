"""`tdllm bench split`: td-only against split on the cpu and process devices, in one run.

The model is the bundled base privatized in its last K blocks (`private_model.py`), fp32, batch
1, greedy. Audits are off while timing (their cost is f x the prefix time, reported separately as
the prefix's own share); crossing bytes exclude the one-time weight upload.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.model.checkpoint import open_checkpoint
from tdllm.protection.private_model import private_checkpoint
from tdllm.protection.profiles import ProtectionOptions, build_model, close_model, crossing_of

CONFIGS = (("td-only", "cpu"), ("split", "cpu"), ("split", "process"))


def run_split_bench(
    k: int, prompt_tokens: int, new_tokens: int, repeats: int, status: Callable[[str], None]
) -> dict[str, Any]:
    checkpoint = private_checkpoint(open_checkpoint("bundled"), k)
    prompt = [(i * 7919) % 1000 + 100 for i in range(prompt_tokens)]
    max_seq = prompt_tokens + new_tokens + 1
    rows: list[dict[str, Any]] = []
    for profile, device in CONFIGS:
        status(f"bench: {profile} on {device} ...")
        options = ProtectionOptions(profile, device, k, audit_rate=0.0)
        model = build_model(checkpoint, torch.float32, options, 1, max_seq)
        try:
            rows.append(_measure(model, checkpoint, prompt, new_tokens, repeats, profile, device))
        finally:
            close_model(model)
    base = rows[0]["seconds"]
    for row in rows:
        row["time_vs_td_only"] = round(row["seconds"] / base, 3)
    return {
        "model": checkpoint.name,
        "k": k,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def _measure(
    model: Any,
    checkpoint: Any,
    prompt: list[int],
    new_tokens: int,
    repeats: int,
    profile: str,
    device: str,
) -> dict[str, Any]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine = Engine(
        model, checkpoint.tokenizer, max_batch=1, max_seq_len=len(prompt) + new_tokens + 1
    )
    engine.generate([prompt], params)  # warm-up
    crossing = crossing_of(model)
    before = crossing.transcript.bytes_crossed() if crossing else 0
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = engine.generate([prompt], params)[0]
        best = min(best, time.perf_counter() - start)
    crossed = (crossing.transcript.bytes_crossed() - before) / repeats if crossing else 0
    tokens = len(prompt) + len(out.token_ids)
    return {
        "profile": profile,
        "device": device,
        "seconds": round(best, 4),
        "tokens_per_s": round(len(out.token_ids) / best, 2),
        "crossing_bytes_per_token": round(crossed / tokens, 1),
    }


def format_split_report(report: dict[str, Any]) -> str:
    head = (
        f"model {report['model']}, K={report['k']}, prompt {report['prompt_tokens']} + "
        f"{report['new_tokens']} new tokens, batch 1, fp32, {report['threads']} threads"
    )
    lines = [
        head,
        f"{'profile':<8} {'device':<8} {'s/run':>8} {'tok/s':>8} {'x td-only':>9} "
        f"{'bytes/token':>12}",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['profile']:<8} {r['device']:<8} {r['seconds']:>8.3f} {r['tokens_per_s']:>8.2f} "
            f"{r['time_vs_td_only']:>9.3f} {r['crossing_bytes_per_token']:>12.1f}"
        )
    return "\n".join(lines)
