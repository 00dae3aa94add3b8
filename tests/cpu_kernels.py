"""Marks for tests of kernels that only some CPUs run (the tests must hold on AMD EPYC too, with
AVX-512 (Zen 4) or AVX2 only (Zen 3))."""

from __future__ import annotations

import pytest

from tdllm.model import avx2_kernel, avx512_kernel
from tdllm.model.cpu_features import HAS_VNNI

needs_avx512 = pytest.mark.skipif(
    bool(avx512_kernel.missing_cpu_flags()), reason="our kernels need AVX-512 VNNI"
)
# our AVX2 kernels (`quant: w4a8` without AVX-512): every x86-64 CPU of the last decade
needs_avx2 = pytest.mark.skipif(
    bool(avx2_kernel.missing_cpu_flags()), reason="our AVX2 kernels need AVX2, FMA and F16C"
)
# FBGEMM's and oneDNN's W8A8 are refused without VNNI (an AMD EPYC of AVX2 only has none)
needs_vnni = pytest.mark.skipif(not HAS_VNNI, reason="W8A8 needs a CPU with VNNI")
# the W8A8 quants where the CPU has their instructions
W8A8_QUANTS = [
    pytest.param("w8a8", marks=needs_vnni),
    pytest.param("w8a8-onednn", marks=needs_vnni),
    pytest.param("w8a8-avx512", marks=needs_avx512),
    pytest.param("w8a8-avx2", marks=needs_avx2),
]
# the quants of int4 weights, likewise
INT4_QUANTS = [
    "int4",
    pytest.param("w4a8", marks=needs_avx2),
    pytest.param("w4a8-avx512", marks=needs_avx512),
]
