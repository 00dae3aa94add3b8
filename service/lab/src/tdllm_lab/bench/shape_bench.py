"""`tdllm bench --shape`: our engine and llama.cpp on synthetic models of real shapes, one run.

For each format (f16, q8_0, q4_0) of the shape's synthetic GGUF (`synthetic_shapes`), our engine
(bf16 activations; quant none, int8, int4: the blocks go straight into our kernels) and llama.cpp
(F16, Q8_0, Q4_0 on the same file, the same thread count) run one after the other in fresh
processes, format by format, so load bursts on a shared machine hit both alike. Decode at batch 1
is also put against the memory bandwidth: the weight bytes a decode step reads (each engine's own
layout) times tok/s, as a share of the measured read bandwidth (`bandwidth.read_gb_s`). Before
anything is written or loaded, the memory it needs is estimated and checked against what the
machine has available, so a shape that does not fit is refused with the numbers, not OOM-killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tdllm.errors import TdllmError, UsageError
from tdllm_lab.bench import llama_cpp_peer, vllm_peer
from tdllm_lab.bench.bandwidth import measured_in_subprocess
from tdllm_lab.bench.machine import machine
from tdllm_lab.bench.synthetic_shapes import (
    DEFAULT_DIR,
    Shape,
    cached_path,
    decode_bytes,
    ensure_gguf,
    file_bytes,
    format_named,
    shape_named,
)

# ours-compiled: our engine with its decode step compiled (`compile: decode`); ours-w8a8: the
# Q8_0 file as W8A8 (`quant: w8a8`, activations rounded to int8 too) instead of weight-only int8;
# ours-compiled-w8a8: both; ours-w8a8-onednn: W8A8 on oneDNN's int8 GEMM (`quant: w8a8-onednn`);
# ours-w8a8-avx512 (and compiled): W8A8 on our AVX-512 VNNI kernel (`quant: w8a8-avx512`);
# ours-w8a8-avx2: the Q8_0 file as int8 per 32 times inputs per 32 on our AVX2 kernel;
# ours-w4a8 (and compiled, grouped): the Q4_0 file on our int4 kernel (`quant: w4a8`: AVX-512
# VNNI where the CPU has it, else AVX2); ours-w4a8-avx512 (likewise): on the AVX-512 one;
# ours-grouped-*: compiled a group of blocks at a time (`compile: decode-groups`)
QUANT_ENGINES = {
    "ours-w8a8": "w8a8",
    "ours-compiled-w8a8": "w8a8",
    "ours-w8a8-onednn": "w8a8-onednn",
    "ours-w8a8-avx512": "w8a8-avx512",
    "ours-compiled-w8a8-avx512": "w8a8-avx512",
    "ours-w8a8-avx2": "w8a8-avx2",
    "ours-w4a8": "w4a8",
    "ours-compiled-w4a8": "w4a8",
    "ours-grouped-w4a8": "w4a8",
    "ours-w4a8-avx512": "w4a8-avx512",
    "ours-compiled-w4a8-avx512": "w4a8-avx512",
    "ours-grouped-w4a8-avx512": "w4a8-avx512",
}
FILE_QUANT = {
    "w4a8": "int4",
    "w4a8-avx512": "int4",
}  # the file each of those runs (the rest: int8, q8_0)
OURS = ("ours", "ours-compiled", "ours-grouped", *QUANT_ENGINES)
PEERS = (llama_cpp_peer.ENGINE, vllm_peer.ENGINE)
ENGINES = (*OURS, *PEERS)
DEFAULT_FORMATS = ("f16", "q8_0", "q4_0")
GB = 1e9
RUNTIME_BYTES = 0.8e9  # interpreter, torch or llama.cpp, compute buffers and logits (measured ~0.6)
COMPILER_BYTES = 0.5e9  # dynamo, inductor and the compiled graph's buffers (measured ~0.3)
VLLM_RUNTIME_BYTES = 2.5e9  # vLLM, its compiler and buffers (measured 2.2 GB on the 135M shape)
# our engine's bytes per weight in memory, per quant (int4 g32: bf16 scale + zero per 32 weights)
OURS_BYTES_PER_WEIGHT = {
    "none": 2.0,
    "int8": 1.0,
    "w8a8": 1.0,
    "w8a8-onednn": 1.0,
    "w8a8-avx512": 1.0,
    "w8a8-avx2": 1.0 + 2 / 32,  # an fp16 scale per 32 weights
    "int4": 0.5 + 4 / 32,
    "w4a8": 0.5 + 4 / 32,  # fp16 scale + offset per 32 (AVX2 and Q4_0: no offset, 2 / 32)
    "w4a8-avx512": 0.5 + 4 / 32,
}


def ours_decode_bytes(shape: Shape, quant: str) -> int:
    """Weight bytes our engine reads per decode step, estimated from the shape (the memory check
    before a run; a run's row has its model's own, `held_memory.step_bytes`): projections in
    its layout, the lm_head (int8 under int4, as `quant_table` keeps it; shared with the bf16
    embedding under none), and the bf16 norms."""
    per = OURS_BYTES_PER_WEIGHT[quant]
    projections = 0
    for name, dims in shape.tensors():
        if name.startswith("blk.") and len(dims) == 2:
            projections += dims[0] * dims[1]
    int4 = FILE_QUANT.get(quant, quant) == "int4"
    head = shape.vocab * shape.hidden * (OURS_BYTES_PER_WEIGHT["int8"] if int4 else per)
    norms = (2 * shape.layers + 1) * shape.hidden * 2
    return int(projections * per + head + norms)


def vllm_decode_bytes(shape: Shape, fmt: str) -> int:
    """Weight bytes vLLM reads per decode step: bf16 or int8 projections (int8: plus a float32
    scale per output row, which is noise), the head in bf16 either way, the bf16 norms."""
    per = 1 if vllm_peer.SETTINGS[fmt] == "w8a8" else 2
    projections = sum(
        dims[0] * dims[1]
        for name, dims in shape.tensors()
        if name.startswith("blk.") and len(dims) == 2
    )
    norms = (2 * shape.layers + 1) * shape.hidden * 2
    return int(projections * per + shape.vocab * shape.hidden * 2 + norms)


def vllm_weight_bytes(shape: Shape, fmt: str) -> int:
    """vLLM's weights of the `fmt` file in memory (and its twin on disk): what a step reads,
    plus the embedding beside an untied head; 0 for a format vLLM does not run here."""
    if fmt not in vllm_peer.SETTINGS:
        return 0
    untied = 0 if shape.tied else shape.vocab * shape.hidden * 2
    return vllm_decode_bytes(shape, fmt) + untied


def memory_needed(shape: Shape, fmt: str, max_tokens: int, batch: int = 8) -> dict[str, float]:
    """Bytes each engine holds at its peak (anonymous memory; the file's own pages are page
    cache, which the kernel can drop): ours keeps its weights plus a bf16 embedding (unless the
    tied head shares it) and, while loading, one fp32 and one bf16 copy of the embedding;
    llama.cpp maps the file. Both add the KV cache and `RUNTIME_BYTES`."""
    _, _, quant = format_named(fmt)
    embedding = shape.vocab * shape.hidden
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * max_tokens * batch * 2
    shared = shape.tied and quant == "none"
    ours = ours_decode_bytes(shape, quant) + (0 if shared else embedding * 2) + embedding * 6
    peer = file_bytes(shape, fmt) + kv // batch
    vllm_weights = vllm_weight_bytes(shape, fmt)
    return {
        **{e: ours + kv + RUNTIME_BYTES + (COMPILER_BYTES if compiled(e) else 0) for e in OURS},
        llama_cpp_peer.ENGINE: peer + RUNTIME_BYTES,
        # vLLM's KV cache is the fixed space it is given; q4_0: no vLLM run (`_run_one`)
        vllm_peer.ENGINE: vllm_weights + vllm_peer.KV_CACHE_GIB * 2**30 + VLLM_RUNTIME_BYTES
        if vllm_weights
        else 0,
    }


def available_memory() -> int:
    """MemAvailable (/proc/meminfo): what can be allocated without swapping (page cache that the
    kernel can drop counts as available)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise TdllmError("/proc/meminfo has no MemAvailable line")


def check_resources(
    key: str,
    formats: Sequence[str],
    engines: Sequence[str],
    max_tokens: int,
    folder: Path,
    available: int | None = None,
) -> None:
    """Refuse (a `UsageError` with the numbers) a run that would not fit in memory or on disk."""
    shape = shape_named(key)
    available = available_memory() if available is None else available
    for fmt in formats:
        need = memory_needed(shape, fmt, max_tokens)
        worst = max(need[e] for e in engines)
        if worst > available:
            raise UsageError(
                f"shape {key} ({shape.name}) in {fmt} needs about {worst / GB:.1f} GB of memory "
                f"({', '.join(f'{e} {need[e] / GB:.1f} GB' for e in engines)}) but only "
                f"{available / GB:.1f} GB are available; try a smaller --format (q4_0) or shape"
            )
    missing = [f for f in formats if not cached_path(folder, key, shape, f).is_file()]
    disk_needed = sum(file_bytes(shape, f) for f in missing)
    if vllm_peer.ENGINE in engines:  # vLLM's twins of the files, written beside them
        twins = [f for f in formats
                 if f in vllm_peer.SETTINGS and not _twin_written(folder, key, f)]  # fmt: skip
        missing += [f"{f} (vLLM's twin)" for f in twins]
        disk_needed += sum(vllm_weight_bytes(shape, f) for f in twins)
    probe = folder if folder.exists() else Path(".")
    free = shutil.disk_usage(probe).free
    if disk_needed > free:
        raise UsageError(
            f"writing shape {key} in {', '.join(missing)} needs {disk_needed / GB:.1f} GB on disk "
            f"but {probe.resolve()} has {free / GB:.1f} GB free"
        )


def _twin_written(folder: Path, key: str, fmt: str) -> bool:
    gguf = cached_path(folder, key, shape_named(key), fmt)
    return (vllm_peer.checkpoint_dir(gguf, fmt) / vllm_peer.DONE).is_file()


def run_shape_bench(
    key: str,
    formats: Sequence[str],
    engines: Sequence[str],
    dtype: str,
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    progress: Callable[[str], None],
    folder: Path = DEFAULT_DIR,
    batch_sizes: tuple[int, ...] = (1, 8),
    sealed: bool = False,
) -> dict[str, Any]:
    shape = shape_named(key)
    check_resources(key, formats, engines, prompt_tokens + new_tokens + 8, folder)
    threads = _threads()
    report: dict[str, Any] = {
        "machine": machine() | {"load_average": os.getloadavg()},
        "shape": {"key": key} | vars(shape) | {"parameters": shape.parameters()},
        "settings": {"dtype": dtype, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                     "repeats": repeats, "threads": threads, "batch_sizes": list(batch_sizes)},
        "peer": llama_cpp_peer.version() or llama_cpp_peer.NOT_INSTALLED,
        "results": [],
    }  # fmt: skip
    paths = {}
    for fmt in formats:
        progress(f"bench: synthetic {key} {fmt} (written once into {folder}) ...")
        paths[fmt] = ensure_gguf(key, fmt, folder)
    progress("bench: read bandwidth ...")
    report["read_gb_s"] = round(measured_in_subprocess(), 2)
    for fmt in formats:
        for engine in engines:
            progress(f"bench: {engine} {fmt} ...")
            row = _run_one(engine, paths[fmt], fmt, dtype, prompt_tokens, new_tokens, repeats,
                           threads, batch_sizes, progress)  # fmt: skip
            if "decode_b1_tok_s" in row:
                add_bus_share(row, shape, engine, fmt, report["read_gb_s"])
            report["results"].append(row)
    report["ratios"] = peer_ratios(report["results"])
    if vllm_peer.ENGINE in engines:
        report["vllm_ratios"] = peer_ratios(report["results"], vllm_peer.ENGINE)
    if sealed:
        from tdllm_lab.bench.shape_sealed import sealed_load

        quantized = [f for f in formats if format_named(f)[2] != "none"]
        also = (paths[quantized[-1]], format_named(quantized[-1])[2]) if quantized else None
        report["sealed_load"] = sealed_load(
            ensure_gguf(key, "f16", folder), progress, quantized=also
        )
    return report


def add_bus_share(
    row: dict[str, Any], shape: Shape, engine: str, fmt: str, read_gb_s: float
) -> None:
    """A decode row's weight bytes a token and its share of the measured read bandwidth: ours
    from what its model holds (the worker's ``decode_weight_bytes``, always in our rows), a peer
    from its file."""
    if engine in OURS:
        weight = row.pop("decode_weight_bytes")
    else:
        weight = peer_decode_bytes(shape, engine, fmt)
    row["decode_weight_gb"] = round(weight / GB, 3)
    row["bandwidth_share"] = round(row["decode_b1_tok_s"] * weight / GB / read_gb_s, 3)


def peer_decode_bytes(shape: Shape, engine: str, fmt: str) -> int:
    """The weight bytes peer `engine` reads per decode step on the `fmt` file, in its own layout
    (ours are measured from the loaded model instead, `held_memory.step_bytes`)."""
    if engine == vllm_peer.ENGINE:
        return vllm_decode_bytes(shape, fmt)
    return decode_bytes(shape, fmt)


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _run_one(
    engine: str,
    path: Path,
    fmt: str,
    dtype: str,
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    threads: int,
    batch_sizes: tuple[int, ...],
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    base = {"engine": engine, "format": fmt}
    quant = QUANT_ENGINES.get(engine)
    if quant and format_named(fmt)[2] != FILE_QUANT.get(quant, "int8"):
        bits = FILE_QUANT.get(quant, "int8")
        return base | {
            "status": f"{quant} runs the {'q4_0' if bits == 'int4' else 'q8_0'} file only"
        }
    if engine == vllm_peer.ENGINE:
        return base | _run_vllm(path, fmt, prompt_tokens, new_tokens, repeats, threads,
                                batch_sizes, progress)  # fmt: skip
    if engine == llama_cpp_peer.ENGINE:
        if not llama_cpp_peer.available():
            return base | {"status": llama_cpp_peer.NOT_INSTALLED}
        cmd = [sys.executable, "-m", "tdllm_lab.bench.llama_cpp_peer", str(path),
               "--threads", str(threads)]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "tdllm_lab.bench.engine_worker", "ours", dtype,
               "--model", str(path), "--quant", ours_quant(engine, fmt),
               "--batch-sizes", ",".join(map(str, batch_sizes)),
               "--compile", compile_mode(engine)]  # fmt: skip
    cmd += ["--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens),
            "--repeats", str(repeats)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
    if proc.returncode != 0:  # a row of its own: one crashed engine does not lose the others'
        why = failure(proc.returncode, proc.stderr)
        return base | {"status": f"{WORKER_FAILED}: {why}", "failure": why}
    result: dict[str, Any] = json.loads(proc.stdout)
    return result | base  # the worker says "ours" for each of our engines


def _run_vllm(
    path: Path,
    fmt: str,
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    threads: int,
    batch_sizes: tuple[int, ...],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """vLLM's CPU build on the `fmt` file's Hugging Face twin, with our worker's prompt ids."""
    from tdllm.sources import open_checkpoint
    from tdllm_lab.bench.engine_worker import prompts
    from tdllm_lab.bench.serve import vllm_python

    if fmt not in vllm_peer.SETTINGS:
        return {"status": vllm_peer.UNSUPPORTED}
    try:
        python = vllm_python()
    except UsageError:
        return {"status": vllm_peer.NOT_INSTALLED}
    checkpoint = vllm_peer.ensure_checkpoint(path, fmt, progress)
    tokenizer = open_checkpoint(str(path)).tokenizer
    batches = {b: prompts(tokenizer, prompt_tokens, b) for b in sorted({1, *batch_sizes})}
    options = ["--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens),
               "--repeats", str(repeats)]  # fmt: skip
    proc = vllm_peer.measure(python, checkpoint, batches, threads, options, subprocess.run)
    if proc.returncode != 0:
        why = failure(proc.returncode, proc.stderr)
        return {"status": f"{WORKER_FAILED}: {why}", "failure": why}
    lines = proc.stdout.strip().splitlines()  # vLLM logs to stdout too: the result is last
    if not lines or not lines[-1].startswith("{"):
        return {"status": f"{WORKER_FAILED}: no result line", "failure": "no result line"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


WORKER_FAILED = "worker failed"


def failure(returncode: int, stderr: str) -> str:
    """Why a worker failed, in one line: its signal (llama.cpp's AMX path died of SIGSEGV) and
    its last line of stderr."""
    last = (stderr.strip().splitlines() or [""])[-1]
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}" + (f" ({last})" if last else "")
    return last or f"exit status {returncode}"


def failed_workers(report: dict[str, Any]) -> list[str]:
    """``engine/format: why`` for each row whose worker failed."""
    return [
        f"{r['engine']}/{r['format']}: {r['failure']}" for r in report["results"] if "failure" in r
    ]


def compiled(engine: str) -> bool:
    """Whether one of our engines runs its decode step compiled (`compile_mode`)."""
    return compile_mode(engine) != "off"


def compile_mode(engine: str) -> str:
    """One of our engines' `compile`: ours-compiled-* `decode`, ours-grouped-* `decode-groups`."""
    if engine.startswith("ours-compiled"):
        return "decode"
    return "decode-groups" if engine.startswith("ours-grouped") else "off"


def ours_quant(engine: str, fmt: str) -> str:
    """Our engine's `quant` for a format's file: the format's own, or the W8A8 engines' own
    (`QUANT_ENGINES`)."""
    return QUANT_ENGINES.get(engine) or format_named(fmt)[2]


def peer_ratios(
    results: list[dict[str, Any]], peer_engine: str = llama_cpp_peer.ENGINE
) -> dict[str, dict[str, float]]:
    """Ours vs a peer (llama.cpp unless told) per format (``"q4_0"``; compiled: ``"q4_0
    compiled"``); > 1.0: ours is better (speeds ours/peer, RSS peer/ours). Decode at batch 8
    too where both rows have it (llama.cpp's have batch 1 only)."""
    by = {(r["engine"], r["format"]): r for r in results}
    out: dict[str, dict[str, float]] = {}
    for (engine, fmt), ours in by.items():
        peer = by.get((peer_engine, fmt))
        if engine not in OURS or peer is None or "status" in ours or "status" in peer:
            continue
        ratio = {
            "prefill_tok_s": round(ours["prefill_tok_s"] / peer["prefill_tok_s"], 2),
            "decode_b1_tok_s": round(ours["decode_b1_tok_s"] / peer["decode_b1_tok_s"], 2),
        }
        if "decode_b8_tok_s" in ours and "decode_b8_tok_s" in peer:
            ratio["decode_b8_tok_s"] = round(ours["decode_b8_tok_s"] / peer["decode_b8_tok_s"], 2)
        ratio["peak_rss_mb"] = round(peer["peak_rss_mb"] / ours["peak_rss_mb"], 2)
        out[fmt if engine == "ours" else f"{fmt} {engine.removeprefix('ours-')}"] = ratio
    return out


def format_shape_table(report: dict[str, Any]) -> str:
    shape, settings = report["shape"], report["settings"]
    cols = ("engine", "format", "load_s", "prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s",
            "peak_rss_mb", "peak_vs_held", "decode_weight_gb", "bandwidth_share")  # fmt: skip
    lines = [
        f"shape {shape['key']} ({shape['name']}, {shape['parameters'] / 1e9:.2f} B parameters), "
        f"{settings['threads']} threads, prompt {settings['prompt_tokens']}, "
        f"{settings['new_tokens']} new tokens; read bandwidth {report['read_gb_s']} GB/s; "
        f"llama.cpp: {report['peer']}",
        "  ".join(f"{c:>16}" for c in cols),
    ]
    for r in report["results"]:
        if "status" in r:
            lines.append(f"{r['engine']:>16}  {r['format']:>16}  {r['status']}")
            continue
        lines.append("  ".join(f"{r.get(c, '-')!s:>16}" for c in cols))
    for peer, key in (("llama.cpp", "ratios"), ("vLLM", "vllm_ratios")):
        for fmt, row in report.get(key, {}).items():
            lines.append(
                f"ratio tdllm/{peer} ({fmt}, >1 is better): "
                + ", ".join(f"{k} {v}" for k, v in row.items())
            )
    if "sealed_load" in report:
        load = report["sealed_load"]
        lines.append(
            f"load in a fresh process, bf16 weights ({load['sealed_bytes'] / GB:.2f} GB sealed): "
            f"plain {load['plain_s']} s, sealed {load['sealed_s']} s, ratio {load['ratio']}x"
        )
        if "quantized" in load:
            q = load["quantized"]
            lines.append(
                f"sealed {q['file']} loaded with {q['quant']}: as bf16 floats "
                f"{q['floats_bytes'] / GB:.2f} GB in {q['floats_s']} s ({q['floats_cpu_s']} s "
                f"CPU), as GGUF blocks {q['blocks_bytes'] / GB:.2f} GB in {q['blocks_s']} s "
                f"({q['blocks_cpu_s']} s CPU; size x{q['size_ratio']}, load x{q['load_ratio']})"
            )
    return "\n".join(lines)
