"""Quantized projections on the TD CPU: the weights stay int8 (or int4) in memory and
PyTorch's own CPU kernels multiply by them directly, so a decode step reads a half (a quarter) of
the bytes of bf16 from DRAM. Activations stay in the model's dtype (fp32 or bf16) everywhere
else; these kernels take them in bf16 (`staged_quant.KERNEL_DTYPE`: with fp32 operands both fall
back to scalar code, 10-40x slower on this torch build), so an fp32 model rounds each
projection's input to bf16 and widens its output back (bf16 products, fp32 accumulation inside
the kernel).

- `Int8WeightOnlyMethod` (`tdllm.model.int8_methods`): symmetric, one scale per output row
  (``w ~= q * s``, ``q`` in -127..127), ``torch._weight_int8pack_mm``.
- `Int4WeightOnlyMethod` (`tdllm.model.int4_methods`): asymmetric, a scale and a zero per group
  of `group_size` inputs of each row (``w ~= (q - 8) * s + z``, ``q`` in 0..15),
  ``torch._weight_int4pack_mm_for_cpu``.
- `Int8DynamicMethod` (W8A8, `tdllm.model.int8_methods`): `Int8WeightOnlyMethod`'s weights, and
  activations rounded to int8 per row on each call (not weight-only), FBGEMM's int8 GEMM; needs
  VNNI.
- `Int8GroupAvx2Method` (``w8a8-avx2``, `tdllm.model.int8_methods`): int8 weights with a scale
  per 32 inputs (Q8_0's grid), activations rounded to int8 per 32, on our AVX2 kernel; also
  ``w4a8``'s head where the CPU has no AVX-512.
- `Int4W4A8Method` (``w4a8``, `tdllm.model.int4_methods`): `Int4WeightOnlyMethod`'s codes, scales
  and zeros, and activations rounded to int8 per 32 inputs on each call, on our kernel (AVX-512
  VNNI where the CPU has it, else AVX2); `Int4Avx512Method` (``w4a8-avx512``): on the AVX-512
  one only.

Each method stages a projection's rows already quantized, as they arrive (floats or GGUF
blocks, a shard at a time), and packs the projection the moment its last row is in: the
staging they share, `StagedQuantMethod`, is `tdllm.model.staged_quant`'s. This module chooses
the methods for each ``quant`` setting (`quant_table`, `quant_method`).

Kernel choice and fidelity: docs/performance.md, "Weight-only int8 and int4 on the TD CPU", "GGUF
blocks straight into the int kernels" and "W8A8".
"""

from __future__ import annotations

from tdllm.model import avx512_kernel
from tdllm.model.cpu_features import HAS_VNNI
from tdllm.model.int4_methods import Int4Avx512Method, Int4W4A8Method, Int4WeightOnlyMethod
from tdllm.model.int8_methods import Int8DynamicMethod, Int8GroupAvx2Method, Int8WeightOnlyMethod
from tdllm.model.linear import LinearMethod, LinearMethodTable, PrepackedCpuMethod
from tdllm.model.quant_formats import QUANTS, W8A8_BACKENDS


def quant_table(quant: str) -> LinearMethodTable:
    """The methods of every projection for a ``quant`` setting. int4 keeps the lm_head int8
    (as llama.cpp's Q4 mixes keep their output tensor wider): the bundled model's tied head
    loses 9% of its norm to int4 g32 against 1.2% to int8, and it dominated int4's perplexity.
    That head is W8A8 where the CPU has VNNI: FBGEMM reads it 1.5-2x faster than
    ``_weight_int8pack_mm``, at the same perplexity (measured); without VNNI it is int8
    weight-only (W8A8 is refused there). w8a8 keeps q|k|v weight-only: their input (the attention
    norm's output) has the outliers; rounded per row it alone cost +2.2% perplexity, every
    other projection under +0.2% (docs/performance.md, "W8A8"); w8a8-onednn likewise."""
    if quant == "int4":
        return LinearMethodTable([("lm_head", int8_head())], Int4WeightOnlyMethod())
    if quant in (Int4W4A8Method.QUANT, Int4Avx512Method.QUANT):
        body = quant_method(quant)
        assert isinstance(body, Int4W4A8Method)
        # the head int8 on the same library's kernel: W8A8 (per row) on AVX-512's, Q8_0's grid
        # (a scale per 32) on AVX2's
        avx512 = body.kernel is avx512_kernel
        head = Int8DynamicMethod(backend="avx512") if avx512 else Int8GroupAvx2Method(quant)
        return LinearMethodTable([("lm_head", head)], body)
    if quant in W8A8_BACKENDS:
        return LinearMethodTable([("*.qkv_proj", Int8WeightOnlyMethod())], quant_method(quant))
    if quant == Int8GroupAvx2Method.QUANT:  # inputs rounded per 32: q|k|v's outliers cost
        return LinearMethodTable(default=Int8GroupAvx2Method())  # their own group only
    # "none": the plain kernels, bf16 weights prepacked for oneDNN where that is faster
    return LinearMethodTable(default=quant_method(quant) or PrepackedCpuMethod())


def int8_head() -> LinearMethod:
    """The int8 head of int4's weights: W8A8 (FBGEMM) where the CPU has VNNI, else weight-only."""
    return Int8DynamicMethod() if HAS_VNNI else Int8WeightOnlyMethod()


def quant_method(quant: str) -> LinearMethod | None:
    """The method for a ``quant`` setting ("none": None, the plain kernels)."""
    if quant == "int8":
        return Int8WeightOnlyMethod()
    if quant == "int4":
        return Int4WeightOnlyMethod()
    if quant == Int4W4A8Method.QUANT:
        return Int4W4A8Method()
    if quant == Int4Avx512Method.QUANT:
        return Int4Avx512Method()
    if quant in W8A8_BACKENDS:
        return Int8DynamicMethod(backend=W8A8_BACKENDS[quant])
    if quant == Int8GroupAvx2Method.QUANT:
        return Int8GroupAvx2Method()
    if quant != "none":
        raise ValueError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")
    return None
