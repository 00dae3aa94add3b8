"""`tdllm bench structured`: what grammar-constrained decoding costs per token (issue 16).

The same engine decodes `batch` copies of one chat prompt, greedy, free and under a JSON Schema
(llguidance, `engine/structured.py`), side by side: the two modes take turns `repeats` times on
one loaded model, and each figure is the best of its mode's runs. Only decode steps with every
row still running count (greedy copies of one prompt end together), so the ratio is the
grammar's per-token cost at that batch: the allowed-token mask of every constrained row,
applying it, and advancing each matcher. The schema is an ordinary one (an object of ten
required short strings): large length or count bounds in a schema (`minItems: 1000`) make
llguidance's mask several times dearer (15 vs 1.9 ms a token measured here), a cost of the
schema, not of decoding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.engine.structured import json_grammar
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.loader import load_model
from tdllm_lab.bench.decode_profile import kernel_table

FIELDS = ("name", "city", "country", "job", "hobby", "pet", "food", "color", "song", "motto")
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {field: {"type": "string", "maxLength": 40} for field in FIELDS},
    "required": list(FIELDS),
    "additionalProperties": False,
}
PROMPT = "Describe a made-up person as JSON: " + ", ".join(FIELDS) + "."


def run_structured(
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    batch_sizes: list[int],
    new_tokens: int,
    repeats: int,
    status: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    model, _ = load_model(checkpoint, dtype, kernel_table("served"))
    tokenizer = checkpoint.tokenizer
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]))
    grammar = json_grammar(SCHEMA)
    rows = []
    for batch in batch_sizes:
        engine = Engine(model, tokenizer, batch, len(prompt) + new_tokens + 8, prefill_chunk=0)
        status(f"structured: b={batch}, warm-up")
        _decode(engine, prompt, batch, 4, grammar)
        runs: dict[str, list[dict[str, float]]] = {"free": [], "json_schema": []}
        for attempt in range(repeats):  # modes interleaved: a noisy minute hits both alike
            for mode in runs:
                status(f"structured: b={batch}, {mode}, run {attempt + 1}/{repeats}")
                constraint = grammar if mode == "json_schema" else None
                runs[mode].append(_decode(engine, prompt, batch, new_tokens, constraint))
        free = max(r["tok_s"] for r in runs["free"])
        constrained = max(r["tok_s"] for r in runs["json_schema"])
        rows.append(
            {
                "batch": batch,
                "free_tok_s": round(free, 1),
                "json_schema_tok_s": round(constrained, 1),
                "ratio": round(constrained / free, 3),
                "overhead_pct": round(100 * (1 - constrained / free), 1),
                "runs": runs,
            }
        )
    return {
        "model": checkpoint.name,
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "rows": rows,
    }


def _decode(
    engine: Engine, prompt: list[int], batch: int, new_tokens: int, grammar: str | None
) -> dict[str, float]:
    """`batch` copies of `prompt`, prefilled first; decode tok/s over the steps that still ran
    every row (the grammar's cost is per decoded token)."""
    params = SamplingParams(
        max_tokens=new_tokens, temperature=0.0, ignore_eos=grammar is None, grammar=grammar
    )
    for _ in range(batch):
        engine.submit(prompt, params)
    engine.step()  # every prompt prefilled, every first token sampled
    steps, seconds = 0, 0.0
    while engine.has_work:
        started = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - started
        if len(outputs) == batch and all(o.finish_reason is None for o in outputs):
            steps += 1
            seconds += elapsed
    tok_s = batch * steps / seconds if seconds else 0.0
    return {"tokens": batch * steps, "seconds": round(seconds, 3), "tok_s": tok_s}


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']} {report['dtype']}, {report['threads']} threads, "
        f"{report['new_tokens']} new tokens, best of {report['repeats']}",
        "batch  free tok/s  json_schema tok/s  ratio  overhead",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['batch']:>5}  {r['free_tok_s']:>10}  {r['json_schema_tok_s']:>17}  "
            f"{r['ratio']:>5}  {r['overhead_pct']:>6}%"
        )
    return "\n".join(lines)
