"""Which vLLM options a deployment may set (`vllm_args`), and how their values must look.

Only capacity and speed knobs pass. Options that change what is loaded or who can reach it
(`--model`, `--tokenizer`, `--load-format`, `--host`, `--port`, `--uds`, LoRA modules,
`--trust-remote-code`, download locations) are the service's to set, and options that import
code or files by name (`--middleware`, `--tool-parser-plugin`, chat templates from a path)
would let a settings file run code in the TD that the reference values never measured.
"""

from __future__ import annotations

import re

_INT = re.compile(r"[1-9][0-9]{0,9}")
_COUNT = re.compile(r"0|[1-9][0-9]{0,9}")
_FLOAT = re.compile(r"(0|[1-9][0-9]{0,3})(\.[0-9]{1,4})?")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

# option -> the kind of value it takes ("flag": none)
ALLOWED: dict[str, str] = {
    "--max-num-seqs": "int",
    "--max-num-batched-tokens": "int",
    "--max-model-len": "int",
    "--block-size": "int",
    "--seed": "int",
    "--max-logprobs": "count",  # 0: no logprobs at all (docs/vllm.md, what it protects)
    "--tensor-parallel-size": "int",
    "--pipeline-parallel-size": "int",
    "--gpu-memory-utilization": "float",
    "--kv-cache-dtype": "name",
    "--quantization": "name",
    "--tool-call-parser": "name",  # one of vLLM's built-in parsers, by name
    "--reasoning-parser": "name",
    "--enable-prefix-caching": "flag",
    "--no-enable-prefix-caching": "flag",
    "--enable-chunked-prefill": "flag",
    "--no-enable-chunked-prefill": "flag",
    "--enable-auto-tool-choice": "flag",
    "--enforce-eager": "flag",
    # scale-out over TDs (docs/scale-out.md): Ray over the attested cluster, or one TD's processes
    "--distributed-executor-backend": "executor",
}
_VALUES = {
    "int": _INT,
    "count": _COUNT,
    "float": _FLOAT,
    "name": _NAME,
    "executor": re.compile(r"ray|mp"),
}


def check_vllm_args(args: tuple[str, ...]) -> list[str]:
    """Problems with `args` (each "--option" or "--option=value"); empty when all pass."""
    problems: list[str] = []
    seen: set[str] = set()
    for arg in args:
        option, has_value, value = arg.partition("=")
        kind = ALLOWED.get(option)
        if kind is None:
            problems.append(f"vllm_args: {option!r} is not an allowed vLLM option")
        elif option in seen:
            problems.append(f"vllm_args: {option} is given twice")
        elif kind == "flag" and has_value:
            problems.append(f"vllm_args: {option} takes no value")
        elif kind != "flag" and not _VALUES[kind].fullmatch(value):
            problems.append(f"vllm_args: {option} takes a value ({kind}), as {option}=VALUE")
        seen.add(option)
    pipeline = option_value(args, "--pipeline-parallel-size")
    if "--enforce-eager" in args and pipeline is not None and pipeline.isdigit():
        if int(pipeline) > 1:  # measured: vLLM's CPU runner sets later stages up in warm-up
            problems.append(
                "vllm_args: --enforce-eager with --pipeline-parallel-size > 1 fails in vLLM's "
                "CPU runner (its later stages are prepared only by the compiled warm-up)"
            )
    return problems


def option_value(args: tuple[str, ...], option: str) -> str | None:
    """The value `args` give `option`, if any (after `check_vllm_args` passed)."""
    for arg in args:
        name, _, value = arg.partition("=")
        if name == option:
            return value
    return None
