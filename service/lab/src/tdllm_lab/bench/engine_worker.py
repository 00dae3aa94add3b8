"""One benchmark configuration (engine x dtype) in a fresh process; prints one JSON object.

Run by `tdllm bench` as ``python -m tdllm_lab.bench.engine_worker ENGINE DTYPE ...`` so that
peak RSS and warm caches belong to one configuration only. ``hf`` is Hugging Face transformers'
LlamaForCausalLM loaded from the same GGUF file: the reference we must not be slower than.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.model.loader import load_model, parse_dtype
from tdllm.model.quantized import quant_table
from tdllm.sources import open_checkpoint
from tdllm_lab.bench import held_memory
from tdllm_lab.bench.machine import peak_rss_mb
from tdllm_lab.bench.vllm_peer import decode_seconds

TEXT = (
    "A trust domain keeps the memory of a virtual machine encrypted and integrity protected, so "
    "that the host, the hypervisor and the other guests cannot read or change it. The model owner "
    "ships weights that stay sealed on disk until the key broker has checked a fresh quote. "
)

Generate = Callable[[list[list[int]], int], None]


def prompts(tokenizer: Any, length: int, count: int) -> list[list[int]]:
    ids = tokenizer.encode(TEXT * (length // 20 + 2))
    return [ids[i * 7 : i * 7 + length] for i in range(count)]


def ours(
    source: str, dtype: torch.dtype, max_len: int, quant: str = "none", compile: str = "off"
) -> tuple[Generate, Any, float, tuple[int, int, int]]:
    """Our engine's generate, the tokenizer, the seconds its decode step took to compile, and
    the bytes of its weights as held, of one position's KV and of the weights a decode step
    reads (`held_memory`)."""
    model, checkpoint = load_model(open_checkpoint(source), dtype, quant_table(quant))
    engine = Engine(model, checkpoint.tokenizer, max_batch=8, max_seq_len=max_len, compile=compile)

    def generate(batch: list[list[int]], new_tokens: int) -> None:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        engine.generate(batch, params)

    held = (
        held_memory.weight_bytes(model),
        engine.cache.token_bytes,
        held_memory.step_bytes(model),
    )
    return generate, checkpoint.tokenizer, engine.compile_seconds, held


def hf(source: str, dtype: torch.dtype, max_len: int) -> tuple[Generate, Any]:
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    checkpoint = open_checkpoint(source)
    path = checkpoint.path
    if path.is_dir():
        model: Any = LlamaForCausalLM.from_pretrained(str(path), dtype=dtype)
    else:
        model = LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    model.eval()
    pad = checkpoint.tokenizer.eos_token_id

    def generate(batch: list[list[int]], new_tokens: int) -> None:
        ids = torch.tensor(batch)
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )

    return generate, checkpoint.tokenizer


def timed(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(
    engine: str,
    dtype_name: str,
    source: str,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    quant: str = "none",
    batch_sizes: tuple[int, ...] = (1, 8),
    compile: str = "off",
) -> dict[str, Any]:
    dtype = parse_dtype(dtype_name)
    start = time.perf_counter()
    max_len = prompt_len + new_tokens + 8
    compile_s = 0.0
    held = None
    if engine == "ours":
        generate, tokenizer, compile_s, held = ours(source, dtype, max_len, quant, compile)
    else:
        generate, tokenizer = hf(source, dtype, max_len)
    load_s = time.perf_counter() - start - compile_s
    batches = {b: prompts(tokenizer, prompt_len, b) for b in sorted({1, *batch_sizes})}
    generate(batches[1], 2)  # warm up allocator and kernels
    result: dict[str, Any] = {"engine": engine, "dtype": dtype_name, "quant": quant}
    result["load_s"] = round(load_s, 3)
    if compile != "off":
        result["compile"] = compile
        result["compile_s"] = round(compile_s, 1)
    ttft = timed(lambda: generate(batches[1], 1), repeats)
    result["ttft_s"] = round(ttft, 4)
    result["prefill_tok_s"] = round(prompt_len / ttft, 1)
    for b, batch in batches.items():

        def first_token(batch: list[list[int]] = batch) -> float:
            return timed(lambda: generate(batch, 1), 1)

        def all_tokens(batch: list[list[int]] = batch) -> float:
            return timed(lambda: generate(batch, new_tokens + 1), 1)

        decode_s = decode_seconds(first_token, all_tokens, repeats)
        result[f"decode_b{b}_tok_s"] = round(b * new_tokens / decode_s, 1)
    result["peak_rss_mb"] = peak_rss_mb()
    if held is not None:  # the target: peak <= 1.2x the weights plus the KV at its fullest
        weights, token_bytes, step = held
        kv = held_memory.kv_bytes(token_bytes, max(batches), prompt_len + new_tokens + 1)
        result["weights_mb"] = round(weights / held_memory.MIB, 1)
        result["decode_weight_bytes"] = step  # measured in its layout, for the bus share
        result["kv_mb"] = round(kv / held_memory.MIB, 1)
        result["peak_vs_held"] = round(result["peak_rss_mb"] * held_memory.MIB / (weights + kv), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=["ours", "hf"])
    parser.add_argument("dtype")
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quant", default="none", help="ours: a `quant` setting's value")
    parser.add_argument("--batch-sizes", default="1,8", help="decode batches, comma-separated")
    parser.add_argument("--compile", default="off", help="ours: off, decode, decode-groups")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = run(
        args.engine,
        args.dtype,
        args.model,
        args.prompt_tokens,
        args.new_tokens,
        args.repeats,
        args.quant,
        tuple(int(b) for b in args.batch_sizes.split(",")),
        args.compile,
    )
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
