"""What the tdllm engine may compile (`compile` setting, `--compile`): nothing, the decode step
as one frozen graph, or a group of its blocks at a time (`tdllm.model.compiled_decode`). Kept
free of torch so settings and the CLI can check it."""

COMPILE_MODES = ("off", "decode", "decode-groups")
# quants whose projections reach their packed weights through a handle (W8A8 on every backend):
# one graph shared by the blocks cannot take them (`compiled_decode.OUTSIDE_TENSORS`)
NOT_GROUPED_QUANTS = ("w8a8", "w8a8-onednn", "w8a8-avx512")
