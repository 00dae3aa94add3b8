"""`tdllm bench context`: the KV cache at the model's whole context (issue 15, item 3).

Two parts, one loaded model, the service's defaults (`max_batch` slots of the model's whole
context, `prefill_chunk` 256, the `kv_cache_tokens` budget):

- slots: the cache's address space against what it holds in memory (mincore) and the process's
  RSS: idle, at the peak of every slot running a short chat at once, and after they end. The
  cache before pages on demand was `torch.zeros` of the same size: all of it resident from boot.
- depth: one sequence per prompt length, up to the whole context: time to first token (chunked
  prefill, as served), decode tok/s at that depth (attention reads every cached position per
  token), and the cache's resident bytes there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.loader import load_model
from tdllm.settings import Settings
from tdllm_lab.bench.decode_profile import kernel_table
from tdllm_lab.bench.machine import machine, rss_mb

MIB = 1 << 20
CHAT_PROMPT = 128  # each slot's prompt in the slots part
PREFILL_CHUNK = Settings().prefill_chunk


def run_context(
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    max_batch: int,
    prompt_lengths: list[int],
    new_tokens: int,
    status: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    context = checkpoint.config.max_position_embeddings
    for length in prompt_lengths:
        if length + new_tokens > context:
            raise ValueError(f"a {length}-token prompt and {new_tokens} more exceed {context}")
    model, _ = load_model(checkpoint, dtype, kernel_table("served"))
    vocab = checkpoint.config.vocab_size
    budget = Settings().kv_cache_tokens
    engine = Engine(
        model, checkpoint.tokenizer, max_batch, context, PREFILL_CHUNK, kv_tokens=budget
    )
    status(f"context: {max_batch} slots of {context} tokens, a {CHAT_PROMPT}-token chat each")
    slots = _slots(engine, vocab, new_tokens)
    depth = []
    for length in prompt_lengths:
        status(f"context: one {length}-token prompt, then {new_tokens} tokens")
        depth.append(_depth(engine, [(j * 7919 + 11) % vocab for j in range(length)], new_tokens))
    return {
        "model": checkpoint.name,
        "dtype": str(dtype).removeprefix("torch."),
        "machine": machine(),
        "max_batch": max_batch,
        "context": context,
        "kv_cache_tokens": budget,
        "prefill_chunk": PREFILL_CHUNK,
        "token_kib": round(engine.cache.token_bytes / 1024, 2),
        "new_tokens": new_tokens,
        "slots": slots,
        "depth": depth,
    }


def _slots(engine: Engine, vocab: int, new_tokens: int) -> dict[str, Any]:
    cache = engine.cache
    idle = {"kv_resident_mib": _mib(cache.resident_bytes()), "rss_mib": rss_mb()}
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i in range(cache.max_batch):
        engine.submit([(j * 31 + 7 * i + 1) % vocab for j in range(CHAT_PROMPT)], params)
    peak_resident, peak_held = 0, 0
    while engine.has_work:
        engine.step()
        held = sum(r.position + 1 for r in engine.running) * cache.token_bytes
        peak_held = max(peak_held, held)
        peak_resident = max(peak_resident, cache.resident_bytes())
    return {
        "address_space_mib": _mib(cache.nbytes()),  # what torch.zeros used to commit at boot
        "idle": idle,
        "peak": {
            "kv_resident_mib": _mib(peak_resident),
            "kv_held_mib": _mib(peak_held),  # positions x bytes per position, no page rounding
            "rss_mib": rss_mb(),
        },
        "after": {"kv_resident_mib": _mib(cache.resident_bytes()), "rss_mib": rss_mb()},
    }


def _depth(engine: Engine, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    params = SamplingParams(max_tokens=new_tokens + 1, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    request = engine.submit(prompt, params)
    while not engine.step():
        pass
    first = time.perf_counter()
    resident = engine.cache.resident_bytes()
    produced = 0
    while engine.has_work:
        produced += sum(o.request_id == request for o in engine.step())
    decode_s = time.perf_counter() - first
    return {
        "prompt_tokens": len(prompt),
        "ttft_s": round(first - start, 2),
        "prefill_tok_s": round(len(prompt) / (first - start), 1),
        "decode_tok_s": round(produced / decode_s, 1),
        "kv_resident_mib": _mib(resident),
    }


def _mib(nbytes: int) -> float:
    return round(nbytes / MIB, 1)


def format_report(report: dict[str, Any]) -> str:
    s = report["slots"]
    lines = [
        f"{report['model']} {report['dtype']}, {report['machine']['torch_threads']} threads: "
        f"{report['max_batch']} slots of {report['context']} tokens, kv_cache_tokens "
        f"{report['kv_cache_tokens']}, {report['token_kib']} KiB a position",
        f"  KV address space {s['address_space_mib']:.0f} MiB (the up-front cache's size)",
        f"  {'':<6} {'KV resident':>12} {'KV held':>9} {'process RSS':>12}",
        f"  {'idle':<6} {s['idle']['kv_resident_mib']:>8.1f} MiB {'':>9} "
        f"{s['idle']['rss_mib']:>8.0f} MiB",
        f"  {'peak':<6} {s['peak']['kv_resident_mib']:>8.1f} MiB "
        f"{s['peak']['kv_held_mib']:>5.1f} MiB {s['peak']['rss_mib']:>8.0f} MiB",
        f"  {'after':<6} {s['after']['kv_resident_mib']:>8.1f} MiB {'':>9} "
        f"{s['after']['rss_mib']:>8.0f} MiB",
        f"one sequence at depth (prefill_chunk {report['prefill_chunk']}, "
        f"{report['new_tokens']} new tokens):",
        f"  {'prompt':>7} {'TTFT':>8} {'prefill':>11} {'decode':>11} {'KV resident':>12}",
    ]
    for d in report["depth"]:
        lines.append(
            f"  {d['prompt_tokens']:>7} {d['ttft_s']:>6.2f} s {d['prefill_tok_s']:>7.0f} t/s "
            f"{d['decode_tok_s']:>7.1f} t/s {d['kv_resident_mib']:>8.1f} MiB"
        )
    return "\n".join(lines)
