"""The weight-only quantization formats by name, torch-free so that settings can check them
(`tdllm.model.quantized` chooses the methods for each)."""

# w8a8, w8a8-onednn and w8a8-avx512: the same weights, activations and product on three int8
# GEMMs (FBGEMM; oneDNN, faster at prefill and batches; our own AVX-512 VNNI kernel, faster at
# the few rows of a decode step; tdllm.model.w8a8_packed)
# w8a8-avx2: int8 weights with a scale per 32 (Q8_0's grid) times inputs rounded to int8 per 32,
# on our AVX2 kernel (any x86-64 CPU with AVX2: llama.cpp's Q8_0 x Q8_0)
# w4a8: int4's weights times inputs rounded to int8 per 32, on our kernel (AVX-512 VNNI where
# the CPU has it, else AVX2: the same bits); w4a8-avx512: on the AVX-512 one only
QUANTS = (
    "none",
    "int8",
    "int4",
    "w8a8",
    "w8a8-onednn",
    "w8a8-avx512",
    "w8a8-avx2",
    "w4a8",
    "w4a8-avx512",
)
W8A8_BACKENDS = {"w8a8": "fbgemm", "w8a8-onednn": "onednn", "w8a8-avx512": "avx512"}
