"""The weight-only quantization formats by name, torch-free so that settings can check them
(the methods are `tdllm.model.quantized`)."""

# w8a8 and w8a8-onednn: the same weights, activations and product on two int8 GEMMs (FBGEMM,
# oneDNN), one faster at one row, the other at prefill and batches (tdllm.model.w8a8_packed)
QUANTS = ("none", "int8", "int4", "w8a8", "w8a8-onednn")
W8A8_BACKENDS = {"w8a8": "fbgemm", "w8a8-onednn": "onednn"}
