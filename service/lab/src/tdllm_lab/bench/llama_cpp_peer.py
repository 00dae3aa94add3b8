"""llama.cpp (through llama-cpp-python) as a peer engine on the same GGUF file, in its own process.

Run by `tdllm bench --shape` as ``python -m tdllm_lab.bench.llama_cpp_peer GGUF ...``; prints one
JSON object with the fields the engine worker prints (prefill tok/s, time to first token, decode
tok/s at batch 1, peak RSS, load time). The prompt is the same token ids our engine gets
(`engine_worker.prompts` with our reading of the file's tokenizer). Prefill is one ``eval`` of
the prompt (logits of its last token only); a decode step is one ``eval`` of the greedy token
(an argmax over those logits), so llama.cpp's numbers have no sampler or engine loop in them
(ours have both: what a served request costs). llama-cpp-python is the optional
``peers`` extra (`make bench-peers`: it compiles llama.cpp); without it `available` is False.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
from typing import Any

import numpy as np

from tdllm_lab.bench.machine import peak_rss_mb

ENGINE = "llama.cpp"
NOT_INSTALLED = "not installed (make bench-peers)"


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def version() -> str | None:
    if not available():
        return None
    return str(getattr(importlib.import_module("llama_cpp"), "__version__", "?"))


def run(path: str, threads: int, prompt_len: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    from tdllm.sources import open_checkpoint
    from tdllm_lab.bench.engine_worker import prompts

    llama_cpp: Any = importlib.import_module("llama_cpp")
    prompt = prompts(open_checkpoint(path).tokenizer, prompt_len, 1)[0]
    start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=path,
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=prompt_len + new_tokens + 16,
        n_batch=max(prompt_len, 32),
        n_ubatch=max(prompt_len, 32),
        use_mmap=True,
        verbose=False,
    )
    load_s = time.perf_counter() - start
    vocab = llm.n_vocab()

    def greedy() -> int:  # the last evaluated token's logits (the only row llama.cpp keeps)
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(vocab,))))

    def prefill() -> int:
        llm.reset()
        llm.eval(prompt)
        return greedy()

    def decode() -> None:  # after a prefill: new_tokens steps
        token = greedy()
        for _ in range(new_tokens):
            llm.eval([token])
            token = greedy()

    prefill()  # warm-up
    ttft = _median(prefill, repeats)
    decode_times = []
    for _ in range(repeats):
        prefill()
        decode_times.append(_median(decode, 1))
    decode_s = float(np.median(decode_times))
    return {
        "engine": ENGINE,
        "version": version(),
        "threads": threads,
        "load_s": round(load_s, 3),
        "ttft_s": round(ttft, 4),
        "prefill_tok_s": round(prompt_len / ttft, 1),
        "decode_b1_tok_s": round(new_tokens / decode_s, 2),
        "peak_rss_mb": peak_rss_mb(),
    }


def _median(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("gguf")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = run(args.gguf, args.threads, args.prompt_tokens, args.new_tokens, args.repeats)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
