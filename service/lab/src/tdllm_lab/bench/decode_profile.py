"""`tdllm bench decode-profile`: where a decode step's time goes (issue 15).

The bundled model (or any), greedy, `batch` sequences already prefilled, then `steps` decode
steps timed without a profiler (ms/step), and the same number again under torch's CPU profiler.
Every aten op's *self* time is put in one category (matmul, attention, blocks run as one op,
everything else); what the profiled step spends outside every op is Python, dispatch and
allocation, the "overhead" a compiled decode step removes. The profiler adds its own cost per
op, so that share is an upper bound; the unprofiled ms/step is the number to compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from tdllm.engine import Engine, SamplingParams
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.linear import LinearMethodTable
from tdllm.model.loader import load_model
from tdllm.model.quantized import quant_table
from tdllm_lab.bench.held_memory import step_bytes

MATMUL = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::matmul",
    "aten::linear",
    "mkldnn",
    "aten::_weight_int",
    "quantized::linear",  # W8A8 on FBGEMM
    "onednn::qlinear",  # W8A8 on oneDNN
    "tdllm::",  # our W8A8 op around either
    "tdllm_avx512::",  # our own AVX-512 kernels (w8a8, w4a8)
    "tdllm_avx2::w4a8",  # our own AVX2 products (its rows8 is an embedding lookup)
    "tdllm_avx2::w8a8g",
)
ATTENTION = ("scaled_dot_product", "flash_attention", "_efficient_attention")
# a block's whole decode step in one op (`tdllm.model.one_call_block`): products, attention
# and the work between them, not told apart by the profiler
ONE_CALL = ("tdllm_avx2::decode_block",)
CATEGORIES = ("matmul", "attention", "blocks in one op", "other ops")


def kernel_table(kernels: str) -> LinearMethodTable:
    """'served': what td-only serves without quant (bf16 prepacked for oneDNN where that
    applies); 'plain': `F.linear` on the loaded weights (before prepacking); any other name is
    a `quant` (`tdllm.model.quant_formats.QUANTS`)."""
    if kernels == "plain":
        return LinearMethodTable()
    return quant_table("none" if kernels == "served" else kernels)


def category(op: str) -> str:
    if op in ONE_CALL:
        return "blocks in one op"
    if any(op.startswith(m) for m in MATMUL):
        return "matmul"
    if any(a in op for a in ATTENTION):
        return "attention"
    return "other ops"


def profile_decode(
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    batch: int,
    steps: int,
    prompt_tokens: int,
    status: Callable[[str], None] = lambda _: None,
    kernels: str = "served",
    compile: str = "off",
) -> dict[str, Any]:
    """One batch size: `profile_decode_batches` with one entry."""
    return profile_decode_batches(
        checkpoint, dtype, [batch], steps, prompt_tokens, status, kernels, compile
    )[0]


def profile_decode_batches(
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    batches: list[int],
    steps: int,
    prompt_tokens: int,
    status: Callable[[str], None] = lambda _: None,
    kernels: str = "served",
    compile: str = "off",
) -> list[dict[str, Any]]:
    """Each batch size in turn on one engine (one model load, one compile for all)."""
    model, _ = load_model(checkpoint, dtype, kernel_table(kernels))
    max_seq = prompt_tokens + 2 * steps + 8
    engine = Engine(
        model, checkpoint.tokenizer, max(batches), max_seq, compile=compile, status=status
    )
    reports = []
    for batch in batches:
        report = _profile_batch(engine, batch, steps, prompt_tokens, status)
        report |= {"model": checkpoint.name, "kernels": kernels, "compile": compile}
        report["dtype"] = str(dtype).removeprefix("torch.")
        report["compile_seconds"] = round(engine.compile_seconds, 1)
        reports.append(report)
    return reports


def _profile_batch(
    engine: Engine, batch: int, steps: int, prompt_tokens: int, status: Callable[[str], None]
) -> dict[str, Any]:
    params = SamplingParams(max_tokens=2 * steps + 4, temperature=0.0, ignore_eos=True)
    vocab = engine.model.cfg.vocab_size
    ids = [
        engine.submit([(i * 31 + j * 7919 + 100) % vocab for j in range(prompt_tokens)], params)
        for i in range(batch)
    ]
    engine.step()  # prefill every prompt (and the first decode of none)
    for _ in range(3):
        engine.step()  # warm-up decode steps
    status(f"decode-profile: {steps} timed steps at batch {batch}")
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    plain_ms = (time.perf_counter() - start) * 1000 / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        profiled_ms = (time.perf_counter() - start) * 1000 / steps
    for request_id in ids:
        engine.cancel(request_id)
    spent = dict.fromkeys(CATEGORIES, 0.0)
    calls = 0
    matmul_ops = set()
    for event in prof.key_averages():
        spent[category(event.key)] += event.self_cpu_time_total / 1000 / steps
        calls += event.count
        if category(event.key) == "matmul":
            matmul_ops.add(event.key)
    outside = max(0.0, profiled_ms - sum(spent.values()))
    rows = {name: round(ms, 3) for name, ms in spent.items()}
    rows["outside any op"] = round(outside, 3)
    return {
        "batch": batch,
        "steps": steps,
        "prompt_tokens": prompt_tokens,
        "threads": torch.get_num_threads(),
        "ms_per_step": round(plain_ms, 3),
        "profiled_ms_per_step": round(profiled_ms, 3),
        "ms_per_step_by_category": rows,
        "share_by_category": {k: round(v / profiled_ms, 4) for k, v in rows.items()},
        "aten_ops_per_step": round(calls / steps, 1),
        "matmul_ops": sorted(matmul_ops),  # which kernels ran the projections
        "weight_bytes": step_bytes(engine.model),  # the bytes a step reads
    }


def format_report(reports: list[dict[str, Any]]) -> str:
    lines = []
    for r in reports:
        compiled = (
            f" {r['compile']} ({r['compile_seconds']:.0f} s)" if r["compile"] != "off" else ""
        )
        lines.append(
            f"{r['model']} {r['dtype']} {r['kernels']}{compiled} batch {r['batch']}: "
            f"{r['ms_per_step']:.2f} ms/step "
            f"({r['profiled_ms_per_step']:.2f} profiled, {r['aten_ops_per_step']:.0f} aten ops)"
        )
        for name, ms in r["ms_per_step_by_category"].items():
            share = 100 * r["share_by_category"][name]
            lines.append(f"  {name:<16} {ms:8.2f} ms  {share:5.1f}%")
    return "\n".join(lines)
