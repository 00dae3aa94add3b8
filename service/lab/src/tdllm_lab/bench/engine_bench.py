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
    quants: Sequence[str] = ("none",),
) -> dict[str, Any]:
    """Every (dtype, quant, engine); hf runs unquantized only (quant is our engine's)."""
    results = []
    for dtype in dtypes:
        for quant in quants:
            for engine in engines:
                if engine == "hf" and quant != "none":
                    continue
                progress(f"bench: {engine} {dtype} quant {quant} ...")
                cmd = [
                    sys.executable, "-m", "tdllm_lab.bench.engine_worker", engine, dtype,
                    "--model", model, "--prompt-tokens", str(prompt_tokens),
                    "--new-tokens", str(new_tokens), "--repeats", str(repeats),
                    "--quant", quant,
                ]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
                if proc.returncode != 0:
                    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    raise TdllmError(f"bench worker {engine}/{dtype}/{quant} failed: {last}")
                results.append(json.loads(proc.stdout))
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": {"model": model, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                     "repeats": repeats},
        "results": results,
    }  # fmt: skip
    if {"ours", "hf"} <= set(engines):
        report["ratios"] = ratios(results)
    if any(q != "none" for q in quants) and "ours" in engines:
        report["quant_ratios"] = quant_ratios(results)
    return report


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    by = {(r["engine"], r["dtype"], r.get("quant", "none")): r for r in results}
    out: dict[str, dict[str, float]] = {}
    for (engine, dtype, quant), ours in by.items():
        ref = by.get(("hf", dtype, "none"))
        if engine != "ours" or ref is None:
            continue
        row = {m: ours[m] / ref[m] for m in SPEEDS}
        row.update({m: ref[m] / ours[m] for m in COSTS})
        key = dtype if quant == "none" else f"{dtype} {quant}"
        out[key] = {k: round(v, 2) for k, v in row.items()}
    return out


def quant_ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Ours quantized vs ours unquantized in the same dtype (> 1.0: quantized is better)."""
    by = {(r["dtype"], r.get("quant", "none")): r for r in results if r["engine"] == "ours"}
    out: dict[str, dict[str, float]] = {}
    for (dtype, quant), row in by.items():
        ref = by.get((dtype, "none"))
        if quant == "none" or ref is None:
            continue
        ratio = {m: row[m] / ref[m] for m in SPEEDS}
        ratio.update({m: ref[m] / row[m] for m in COSTS})
        out[f"{dtype} {quant}"] = {k: round(v, 2) for k, v in ratio.items()}
    return out


def format_table(report: dict[str, Any]) -> str:
    cols = ("engine", "dtype", "quant", "load_s", "ttft_s", *SPEEDS, "peak_rss_mb")
    lines = ["  ".join(f"{c:>15}" for c in cols)]
    for r in report["results"]:
        lines.append("  ".join(f"{r.get(c, 'none')!s:>15}" for c in cols))
    for key, row in report.get("ratios", {}).items():
        lines.append(
            f"ratio tdllm/hf ({key}, >1 is better): "
            + ", ".join(f"{k} {v}" for k, v in row.items())
        )
    for key, row in report.get("quant_ratios", {}).items():
        lines.append(
            f"ratio quantized/unquantized ({key}, >1 is better): "
            + ", ".join(f"{k} {v}" for k, v in row.items())
        )
    return "\n".join(lines)
