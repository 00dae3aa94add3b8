"""The weight-only quantization formats by name, torch-free so that settings can check them
(the methods are `tdllm.model.quantized`)."""

QUANTS = ("none", "int8", "int4", "w8a8")
