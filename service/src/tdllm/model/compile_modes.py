"""What the tdllm engine may compile (`compile` setting, `--compile`): nothing, or the decode
step (`tdllm.model.compiled_decode`). Kept free of torch so settings and the CLI can check it."""

COMPILE_MODES = ("off", "decode")
