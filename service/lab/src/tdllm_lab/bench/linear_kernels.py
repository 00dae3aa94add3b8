"""`tdllm bench linear-kernels`: which CPU kernel a weight-only quantized projection should use
(issue 15, item 2), timed per shape at decode (1 row) and small-batch (8 rows) sizes.

Every variant multiplies by a different copy of its weight on each call, cycling through enough
copies that the set is twice the CPU's last-level cache (sized from sysfs): a decode step reads
every weight once from DRAM, and a weight reused call after call would be timed from cache
(docs/performance.md, "Where a decode step goes"). Until session 20 the copies covered a fixed 32
MiB eight times; the Intel Xeon we measure on reports 480 MiB, which such a set fits in (its 1B
rows barely moved when this changed: docs/performance.md, "W8A8 at one row, from DRAM"). Reading a
buffer larger than the cache before each call instead was tried and dropped: it evicts the code,
the input and the page tables too, and added a fixed ~0.1-1 ms a call that no decode step pays.
GB/s counts the weight's own bytes (int4: half a byte per weight plus its scales and zeros), so it
compares with the memory bus directly. Times are the best of `calls` (each still from DRAM): on a
shared 2-core machine a preempted OpenMP thread stalls a call by milliseconds, which a median of
small kernels cannot average away; the median is in the JSON too.

Variants: ``F.linear`` in fp32 and bf16; ``torch._weight_int8pack_mm`` (int8, one scale per output
row) with fp32 and bf16 activations; ``torch._weight_int4pack_mm_for_cpu`` (int4, a scale and zero
per group of 32/64/128 inputs) with bf16 activations, where this torch build has it; W8A8
(`Int8DynamicMethod`: the int8 weights, activations rounded to int8 per row, FBGEMM), timed as the
layer runs it (the rounding and the range columns included), on VNNI CPUs; the same W8A8 product on
oneDNN's int8 GEMM instead (``onednn::qlinear_pointwise``, which uses AMX tiles where the CPU has
them; vLLM's CPU build uses oneDNN's int8 matmul where the CPU lacks AMX), each row rounded on its
own grid as ours (a fixed u8 grid of 127 steps a side around 128, the row's max mapped to 127), as
`Int8DynamicMethod`'s second backend runs it (``backend="onednn"``, `quant: w8a8-onednn`); the
same product on our AVX-512 VNNI kernel (``backend="avx512"``, `quant: w8a8-avx512`), timed as the
layer runs it, where the CPU has the instructions; our int4 kernel (`Int4Avx512Method`, `quant:
w4a8-avx512`: int4 g32 codes, inputs rounded to int8 per 32) likewise, and its prompt path
(``avx512_kernel.w4a8_widened``); our AVX2 kernels where the CPU has AVX2 (`quant: w4a8`'s int4
product there, and `w8a8-avx2`'s int8 one: a scale per 32 weights, inputs rounded per 32),
timed as their layers run them; and the
int8 and int4 methods' prefill paths (their weights widened to bf16 a block at a time for oneDNN's
GEMM), whose crossover with the kernels sets ``PREFILL_MIN_ROWS``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tdllm.model import avx2_kernel, avx512_kernel
from tdllm.model.int4_methods import INT4_GROUP_SIZE, Int4Avx512Method, Int4W4A8Method, int4_pack
from tdllm.model.int4_widen import int4_widened_linear
from tdllm.model.int8_methods import (
    WIDEN_BLOCK_ROWS,
    Int8DynamicMethod,
    Int8GroupAvx2Method,
    int8_quantize,
)
from tdllm.model.linear import Linear, LinearMethod, widened_linear

FALLBACK_CACHE_BYTES = 32 << 20  # where sysfs names no cache size
CACHE_MULTIPLE = 2  # the copies of a weight cover the last-level cache this often
MIN_COPIES = 2
MAX_COPIES = 4096  # the bundled o_proj in bf16 needs ~1500 on a 480 MiB cache
SYSFS_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def bundled_shapes(
    hidden: int = 576, q: int = 576, kv: int = 192, inter: int = 1536, vocab: int = 49152
) -> list[tuple[str, int, int]]:
    """(name, in, out) of SmolLM2-135M's projections (fused as our model runs them)."""
    return [
        ("qkv", hidden, q + 2 * kv),
        ("o", q, hidden),
        ("gate|up", hidden, 2 * inter),
        ("down", inter, hidden),
        ("head", hidden, vocab),
    ]


ONE_B_SHAPES = [("1B up", 2048, 8192), ("1B down", 8192, 2048)]


def last_level_cache_bytes(caches: Path = SYSFS_CACHES) -> int:
    """The largest cache CPU 0 reports (``index*/size``, e.g. ``491520K``), or
    `FALLBACK_CACHE_BYTES` where none is readable."""
    sizes = []
    for size in caches.glob("index*/size"):
        text = size.read_text().strip()
        unit = _UNITS.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in _UNITS else text
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=FALLBACK_CACHE_BYTES)


def _variants(weight: torch.Tensor) -> dict[str, tuple[Any, torch.dtype, int]]:
    """Variant name -> (a callable's operands, activation dtype, weight bytes)."""
    out: dict[str, tuple[Any, torch.dtype, int]] = {}
    n, k = weight.shape
    out["fp32"] = ((weight.float().contiguous(),), torch.float32, n * k * 4)
    out["bf16"] = ((weight.bfloat16().contiguous(),), torch.bfloat16, n * k * 2)
    q, scales = int8_quantize(weight)
    out["int8 (fp32 act)"] = ((q, scales.float()), torch.float32, n * k + n * 4)
    out["int8 (bf16 act)"] = ((q, scales.bfloat16()), torch.bfloat16, n * k + n * 2)
    out[INT8_WIDENED] = ((q, scales.bfloat16()), torch.bfloat16, n * k + n * 2)
    if hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        for group in (32, 64, 128):
            if k % group == 0:
                packed, sz = int4_pack(weight, group)
                nbytes = packed.numel() + sz.numel() * 2
                out[f"int4 g{group} (bf16 act)"] = (
                    (packed, sz.bfloat16(), group),
                    torch.bfloat16,
                    nbytes,
                )
                if group == INT4_GROUP_SIZE:
                    out[INT4_WIDENED] = ((packed, sz.bfloat16(), group, n), torch.bfloat16, nbytes)
    if torch.cpu._is_vnni_supported():
        out[W8A8] = ((weight,), torch.bfloat16, n * (k + 2) + n * 4)  # a layer per copy
        out[W8A8_ONEDNN] = ((q, scales.float()), torch.bfloat16, n * k + n * 4)  # packed per copy
    if not avx512_kernel.missing_cpu_flags():  # a layer per copy; scales and weight sums
        out[W8A8_AVX512] = ((weight,), torch.bfloat16, n * k + n * 8)
        if k % avx512_kernel.GROUP == 0:  # int4 codes, an fp16 scale and offset per 32
            out[W4A8_AVX512] = ((weight,), torch.bfloat16, n * k // 2 + n * k // 8)
            # its prompt path: the packed weights widened to bf16 for oneDNN's GEMM
            wide = _quant_layer(weight, "w4a8").qweight
            out[W4A8_WIDENED] = ((wide, n, k), torch.bfloat16, n * k // 2 + n * k // 8)
    if not avx2_kernel.missing_cpu_flags() and k % avx2_kernel.GROUP == 0:
        out[W4A8_AVX2] = ((weight,), torch.float32, n * k // 2 + n * k // 8)
        out[W8A8_AVX2] = ((weight,), torch.float32, n * k + n * k // 8)
    return out


W8A8 = "w8a8 (FBGEMM)"
W8A8_ONEDNN = "w8a8 (oneDNN)"
W8A8_AVX512 = "w8a8 (ours, AVX-512)"
W8A8_LAYERS = {W8A8: "fbgemm", W8A8_AVX512: "avx512"}  # timed as the layer runs them
W4A8_AVX512 = "w4a8 (ours, AVX-512)"  # likewise
W4A8_AVX2 = "w4a8 (ours, AVX2)"
W8A8_AVX2 = "w8a8 per 32 (ours, AVX2)"
# the variants timed as a layer runs them, by the kind `_quant_layer` builds
LAYERS = {
    **W8A8_LAYERS,
    W4A8_AVX512: "w4a8",
    W4A8_AVX2: "w4a8-avx2",
    W8A8_AVX2: "w8a8-avx2",
}
W4A8_WIDENED = "w4a8 widened (bf16 GEMM)"
# the methods' prefill paths: the weights widened to bf16 a block at a time, oneDNN's GEMM
INT8_WIDENED = "int8 widened (bf16 GEMM)"
INT4_WIDENED = f"int4 g{INT4_GROUP_SIZE} widened (bf16 GEMM)"


def _quant_layer(weight: torch.Tensor, kind: str = "fbgemm") -> Linear:
    """A layer holding `weight` as the engine would: W8A8 on backend `kind`, or our kernels'
    methods (``"w4a8"``: the AVX-512 int4 one; ``"w4a8-avx2"``, ``"w8a8-avx2"``: the AVX2 ones)."""
    method: LinearMethod
    if kind == "w4a8":
        method = Int4Avx512Method()
    elif kind == "w4a8-avx2":
        method = Int4W4A8Method(avx2_kernel)
    elif kind == "w8a8-avx2":
        method = Int8GroupAvx2Method()
    else:
        method = Int8DynamicMethod(backend=kind)
    layer = Linear("bench", weight.shape[1], weight.shape[0], method, torch.bfloat16)
    layer.method.load_weight(layer, weight)
    return layer


def onednn_w8a8_operands(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """oneDNN's packed copy of the int8 rows `q` with their per-row `scales` (fp32)."""
    packed = torch.ops.onednn.qlinear_prepack(q, None)
    return packed, scales, torch.zeros(q.shape[0], dtype=torch.long)


def onednn_w8a8(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    """W8A8 on oneDNN: each row of `x` rounded to u8 on its own grid (max|row| -> 127 steps
    above the zero point 128), the int8 GEMM, the row's scale back on; fp32 out."""
    row = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True, dtype=torch.float32)
    row.clamp_(min=torch.finfo(torch.float32).tiny).mul_(1 / 127)
    qx = torch.round(x / row).add_(128).to(torch.uint8)
    y = torch.ops.onednn.qlinear_pointwise(
        qx, 1.0, 128, packed, scales, zeros, None, 1.0, 0, torch.float32, "none", [], ""
    )
    return y.mul_(row)


def _call(name: str) -> Callable[..., torch.Tensor]:
    if name == INT8_WIDENED:
        return lambda x, q, s: widened_linear(x, q, x.dtype, x.dtype, WIDEN_BLOCK_ROWS).mul_(s)
    if name == W4A8_WIDENED:
        return lambda x, p, n, k: avx512_kernel.w4a8_widened(x, p, n, k)
    if name == INT4_WIDENED:
        return lambda x, p, sz, g, n: int4_widened_linear(x, p, sz, g, n)
    if name.startswith("int8"):
        return lambda x, q, s: torch._weight_int8pack_mm(x, q, s)
    if name.startswith("int4"):
        return lambda x, p, sz, g: torch._weight_int4pack_mm_for_cpu(x, p, g, sz)
    if name in LAYERS:
        return lambda x, layer: layer(x)
    if name == W8A8_ONEDNN:
        return onednn_w8a8
    return lambda x, w: F.linear(x, w)


def time_shape(
    name: str,
    in_features: int,
    out_features: int,
    rows: tuple[int, ...],
    calls: int,
    cache_bytes: int = FALLBACK_CACHE_BYTES,
) -> list[dict[str, Any]]:
    """Each variant's best and median time per call at each row count, its copies covering
    `cache_bytes` `CACHE_MULTIPLE` times."""
    gen = torch.Generator().manual_seed(0)
    results = []
    base = torch.randn(out_features, in_features, generator=gen) * 0.05
    for variant, (operands, act, nbytes) in _variants(base).items():
        copies = max(MIN_COPIES, min(MAX_COPIES, -(-CACHE_MULTIPLE * cache_bytes // nbytes)))
        # distinct storage per copy (values equal: the kernels' time does not depend on them)
        if variant in LAYERS:  # packed copies of their own
            sets: list[tuple[Any, ...]] = [
                (_quant_layer(base, LAYERS[variant]),) for _ in range(copies)
            ]
        elif variant == W8A8_ONEDNN:  # and so is oneDNN's (an opaque tensor: no clone)
            sets = [onednn_w8a8_operands(*operands) for _ in range(copies)]
        else:
            sets = [
                tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in operands)
                for _ in range(copies)
            ]
        fn = _call(variant)
        for m in rows:
            x = torch.randn(m, in_features, generator=gen).to(act)
            for s in sets:  # warm up: page in every copy, let the kernel pick its path
                fn(x, *s)
            times = []
            for i in range(calls):
                s = sets[i % copies]
                start = time.perf_counter()
                fn(x, *s)
                times.append(time.perf_counter() - start)
            us = min(times) * 1e6
            results.append(
                {
                    "shape": name,
                    "in": in_features,
                    "out": out_features,
                    "rows": m,
                    "variant": variant,
                    "copies": copies,
                    "us": round(us, 1),
                    "us_median": round(statistics.median(times) * 1e6, 1),
                    # 3 significant digits: a tiny weight under load is well below 0.01 GB/s
                    "weight_gb_s": float(f"{nbytes / us / 1e3:.3g}"),
                }
            )
        del sets
    return results


def run_kernel_bench(
    one_b: bool,
    calls: int,
    progress: Callable[[str], None] = lambda _: None,
    rows: tuple[int, ...] = (1, 8),
) -> dict[str, Any]:
    from tdllm_lab.bench.machine import machine

    shapes = bundled_shapes() + (ONE_B_SHAPES if one_b else [])
    cache = last_level_cache_bytes()
    results = []
    with torch.no_grad():
        for name, k, n in shapes:
            progress(f"linear-kernels: {name} {k}->{n}")
            results += time_shape(name, k, n, rows, calls, cache)
    return {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "last_level_cache_mib": cache >> 20,
        "results": results,
    }


def format_report(report: dict[str, Any]) -> str:
    cache = report.get("last_level_cache_mib")
    covered = f"; copies cover {CACHE_MULTIPLE}x a {cache} MiB cache" if cache else ""
    lines = [f"{report['threads']} threads; best us per call (weight GB/s){covered}"]
    variants = list(dict.fromkeys(r["variant"] for r in report["results"]))
    keys = list(
        dict.fromkeys((r["shape"], r["in"], r["out"], r["rows"]) for r in report["results"])
    )
    by = {(r["shape"], r["rows"], r["variant"]): r for r in report["results"]}
    lines.append(f"{'shape':<22}" + "".join(f"{v:>22}" for v in variants))
    for shape, k, n, m in keys:
        cells = []
        for v in variants:
            r = by.get((shape, m, v))
            cells.append(f"{r['us']:>10.0f} ({r['weight_gb_s']:>5.1f})" if r else "")
        lines.append(f"{f'{shape} {k}->{n} x{m}':<22}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)
