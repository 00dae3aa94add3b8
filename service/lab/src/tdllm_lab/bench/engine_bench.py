"""Our engine vs Hugging Face transformers, same model and prompts, one process per configuration.

Ratios are oriented so that > 1.0 means tdllm is better: speeds are ours/hf; time to first token
and peak RSS are hf/ours.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tdllm.errors import TdllmError
from tdllm_lab.bench.machine import machine

SPEEDS = ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s")
COSTS = ("ttft_s", "peak_rss_mb")


def run_engine_bench(
    dtypes: Sequence[str],
    engines: Sequence[str],
    model: str,
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    results = []
    for dtype in dtypes:
        for engine in engines:
            progress(f"bench: {engine} {dtype} ...")
            cmd = [
                sys.executable, "-m", "tdllm_lab.bench.engine_worker", engine, dtype,
                "--model", model, "--prompt-tokens", str(prompt_tokens),
                "--new-tokens", str(new_tokens), "--repeats", str(repeats),
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise TdllmError(f"bench worker {engine}/{dtype} failed: {last}")
            results.append(json.loads(proc.stdout))
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": {"model": model, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                     "repeats": repeats},
        "results": results,
    }  # fmt: skip
    if {"ours", "hf"} <= set(engines):
        report["ratios"] = ratios(results)
    return report


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    by = {(r["engine"], r["dtype"]): r for r in results}
    out: dict[str, dict[str, float]] = {}
    for (engine, dtype), ours in by.items():
        ref = by.get(("hf", dtype))
        if engine != "ours" or ref is None:
            continue
        row = {m: ours[m] / ref[m] for m in SPEEDS}
        row.update({m: ref[m] / ours[m] for m in COSTS})
        out[dtype] = {k: round(v, 2) for k, v in row.items()}
    return out


def format_table(report: dict[str, Any]) -> str:
    cols = ("engine", "dtype", "load_s", "ttft_s", *SPEEDS, "peak_rss_mb")
    lines = ["  ".join(f"{c:>15}" for c in cols)]
    for r in report["results"]:
        lines.append("  ".join(f"{r[c]!s:>15}" for c in cols))
    for dtype, row in report.get("ratios", {}).items():
        lines.append(
            f"ratio tdllm/hf ({dtype}, >1 is better): "
            + ", ".join(f"{k} {v}" for k, v in row.items())
        )
    return "\n".join(lines)
