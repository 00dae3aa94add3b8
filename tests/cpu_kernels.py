"""Marks for tests of kernels that only some CPUs run (the tests must hold on AMD EPYC too)."""

from __future__ import annotations

import pytest

from tdllm.model import avx512_kernel

needs_avx512 = pytest.mark.skipif(
    bool(avx512_kernel.missing_cpu_flags()), reason="our kernels need AVX-512 VNNI"
)
# the W8A8 quants, ours only where the CPU has its instructions
W8A8_QUANTS = ["w8a8", "w8a8-onednn", pytest.param("w8a8-avx512", marks=needs_avx512)]
# the quants of int4 weights, likewise
INT4_QUANTS = ["int4", pytest.param("w4a8-avx512", marks=needs_avx512)]
