"""What the TD CPU's kernels can use, asked once: thresholds between kernels depend on it."""

from __future__ import annotations

from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The first CPU's flags as Linux lists them (none where the file cannot be read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


# AMX tiles: oneDNN's bf16 GEMM is then several times faster, so widening quantized weights to
# bf16 for it pays from far fewer rows (tdllm.model.int8_methods, tdllm.model.int4_widen)
HAS_AMX = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
# bf16 arithmetic in hardware (AVX512-BF16 or AMX): without it oneDNN has no bf16 GEMM for the
# shapes a widened prefill gives it, and torch's fallback is a scalar loop (measured on an AVX2
# EPYC: 15.8 s for a 512 x 2048 x 2048 product that fp32 runs in 26 ms), so the int kernels
# never widen their weights to bf16 there (`int4_widen.prefill_min_rows`, int8's threshold)
HAS_NATIVE_BF16 = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
# VNNI's int8 dot products: FBGEMM's W8A8 needs them (without, its u8 x s8 pairs saturate in
# int16: `Int8DynamicMethod`), and int4's int8 head is W8A8 only where they are
HAS_VNNI = bool(torch.cpu._is_vnni_supported())
