"""`tdllm bench`: the one group of every benchmark (engine vs transformers, unseal, serve, soak,
split, fidelity). Each writes a report that docs/performance.md quotes with its command."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path
from types import FrameType

import click

from tdllm.cli import QUANT, status
from tdllm.errors import TdllmError, UsageError
from tdllm.model.compile_modes import COMPILE_MODES
from tdllm.model.quant_formats import QUANTS
from tdllm.profiles.options import DEFAULT_K
from tdllm_lab.protection.commands import CACHE_DIR

DTYPE = click.Choice(["bf16", "fp32"])
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
            "ours-w4a8-avx512",
            "ours-compiled-w4a8-avx512",
            "ours-grouped",
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
    "kernel (and compiled); ours-w4a8-avx512: the q4_0 file on our AVX-512 int4 kernel (and "
    "compiled); ours-grouped-*: compiled a group of blocks at a time; vllm-cpu: vLLM's "
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


@bench.command("serve")
@click.option("--url", default=None, help="a running service (default: start one on loopback)")
@click.option(
    "--engine",
    "engines",
    default=None,
    help="compare engines side by side, one at a time: any of "
    + ",".join(["tdllm", *(f"tdllm-{q}" for q in QUANT.choices if q != "none"), "vllm"])
    + ",vllm-alone (tdllm-QUANT: our engine with that quant; vllm-alone: vLLM's server as the "
    "service starts it, with no front); not with --url",
)
@click.option("--clients", "client_counts", default="1,4,8", show_default=True)
@click.option("--requests-per-client", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1, 1024), default=64, show_default=True)
@click.option("--model", default="bundled", show_default=True, help="with --engine")
@click.option("--dtype", type=DTYPE, default="bf16", show_default=True, help="with --engine")
@click.option(
    "--max-batch",
    type=click.IntRange(1, 256),
    default=None,
    help="with --engine; default the largest client count",
)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def bench_serve(
    url: str | None,
    engines: str | None,
    client_counts: str,
    requests_per_client: int,
    max_tokens: int,
    model: str,
    dtype: str,
    max_batch: int | None,
    as_json: bool,
) -> None:
    """Aggregate tokens/s and TTFT p50/p95/p99 for 1, 4, 8 concurrent streaming clients.

    With --engine, per engine and client count also the peak RSS of the server's process tree,
    with ratios against vllm-alone (the front's cost) and tdllm. The vLLM engines need
    TDLLM_VLLM_PYTHON or .venv-vllm/bin/python here (`make vllm`).
    """
    from tdllm_lab.bench.serve import (
        format_engines_report,
        format_report,
        parse_counts,
        parse_engines,
        run_engines_bench,
        run_serve_bench,
    )

    counts = parse_counts(client_counts)
    if engines is None:
        report = run_serve_bench(url, counts, requests_per_client, max_tokens)
        click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
        return
    if url is not None:
        raise UsageError("--engine starts each engine itself: leave out --url")
    chosen = parse_engines(engines)
    report = run_engines_bench(
        chosen,
        counts,
        requests_per_client,
        max_tokens,
        model=model,
        dtype=dtype,
        max_batch=max_batch,
        progress=status,
    )
    click.echo(json.dumps(report, indent=2) if as_json else format_engines_report(report))


@bench.command("soak")
@click.option(
    "--url", default=None, help="a service on this machine (default: start one on loopback)"
)
@click.option("--clients", type=click.IntRange(1, 256), default=32, show_default=True)
@click.option("--minutes", type=click.FloatRange(0.05, 120), default=10.0, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1, 1024), default=64, show_default=True)
@click.option("--disconnect-fraction", type=click.FloatRange(0, 1), default=0.10, show_default=True)
@click.option("--malformed-fraction", type=click.FloatRange(0, 1), default=0.05, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--ramp-s",
    type=click.FloatRange(0, 600),
    default=10.0,
    show_default=True,
    help="clients start evenly over this many seconds",
)
@click.option(
    "--warm-up-s",
    type=click.FloatRange(0, 600),
    default=0.0,
    show_default=True,
    help="run the same load this long before measuring (RSS drift then shows leaks, not warm-up)",
)
@click.option("--model", default="bundled", show_default=True, help="for the loopback service")
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16"]),
    default=None,
    help="for the loopback service (default: the service's)",
)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def bench_soak(
    url: str | None,
    clients: int,
    minutes: float,
    max_tokens: int,
    disconnect_fraction: float,
    malformed_fraction: float,
    seed: int,
    ramp_s: float,
    warm_up_s: float,
    model: str,
    dtype: str | None,
    as_json: bool,
) -> None:
    """Streaming clients for minutes, some disconnecting early, some sending malformed bodies.

    Reports requests and errors by class, cut streams, tok/s, TTFT p50/p99, the service's RSS
    (start/end/max) and /ready after. Loopback only; the started service gets one KV slot per
    client. The API key, when --url wants one, comes from TDLLM_API_KEY.
    """
    from tdllm_lab.bench.soak import SoakConfig, format_report, run_soak

    if disconnect_fraction + malformed_fraction > 1:
        raise UsageError("--disconnect-fraction plus --malformed-fraction must be at most 1")
    config = SoakConfig(
        clients,
        minutes,
        max_tokens,
        disconnect_fraction,
        malformed_fraction,
        seed,
        ramp_s,
        warm_up_s,
        api_key=os.environ.get("TDLLM_API_KEY") or None,
    )
    service = {"model": model} | ({"dtype": dtype} if dtype else {})
    report = run_soak(url, config, lambda line: click.echo(line, err=True), service)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@bench.command("split")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--k", type=click.IntRange(1), default=DEFAULT_K, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option("--new-tokens", type=click.IntRange(2, 4096), default=32, show_default=True)
@click.option("--repeats", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option(
    "--devices",
    default="cpu,process",
    show_default=True,
    help="comma-separated devices for the split, masked and obfuscated rows (cpu, process, cuda)",
)
@click.option(
    "--tail",
    type=click.Choice(["finetuned", "stand-in"]),
    default="finetuned",
    show_default=True,
    help="the private model: the real fine-tune (trained once) or the base's perturbed stand-in",
)
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True
)
@click.option(
    "--quant",
    "quants",
    type=QUANT,
    multiple=True,
    default=("none",),
    show_default=True,
    help="td-only's projections, split's private tail and masked's TD-held delta and head "
    "int8/int4 (obfuscated refuses a quant: its rows are left out); repeatable: every quant's "
    "rows in one round-robin",
)
@CACHE_DIR
def bench_split(
    as_json: bool,
    k: int,
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    devices: str,
    tail: str,
    dtype: str,
    quants: tuple[str, ...],
    cache_dir: Path | None,
) -> None:
    """td-only vs split, masked and obfuscated on each device, on the private fine-tune
    (trained once): tokens/s, crossing bytes per token and greedy tokens vs cpu, in one run."""
    import torch

    from tdllm_lab.bench.split import format_split_report, run_split_bench
    from tdllm_lab.protection.private_cache import DEFAULT_CACHE

    report = run_split_bench(
        k,
        prompt_tokens,
        new_tokens,
        repeats,
        status,
        cache_dir or DEFAULT_CACHE,
        device_list(devices),
        tail,
        getattr(torch, dtype),
        tuple(dict.fromkeys(quants)),  # each once, in the order given
    )
    click.echo(json.dumps(report, indent=2) if as_json else format_split_report(report))


def device_list(devices: str) -> tuple[str, ...]:
    """`--devices cpu,cuda` checked up front: one clear error, not a failure mid-benchmark."""
    from tdllm.trusted.crossing import DEVICE_KINDS, available_devices

    chosen = tuple(d.strip() for d in devices.split(",") if d.strip())
    unknown = [d for d in chosen if d not in DEVICE_KINDS]
    if not chosen or unknown:
        raise click.BadParameter(
            f"{', '.join(unknown) or 'none given'}; choose from {', '.join(DEVICE_KINDS)}",
            param_hint="--devices",
        )
    missing = [d for d in chosen if d not in available_devices()]
    if missing:
        raise click.BadParameter(f"{', '.join(missing)} not available here", param_hint="--devices")
    return chosen


@bench.command("tolerance")
@click.option(
    "--devices", default="cpu", show_default=True, help="comma-separated: cpu, process, cuda"
)
@click.option(
    "--dtypes", default="float32,bfloat16", show_default=True, help="comma-separated dtypes"
)
@click.option("--k", type=click.IntRange(1), default=DEFAULT_K, show_default=True)
@click.option("--prompts", "num_prompts", type=click.IntRange(1, 16), default=4, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(1, 1024), default=48, show_default=True)
@click.option("--new-tokens", type=click.IntRange(1, 512), default=32, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def bench_tolerance(
    devices: str,
    dtypes: str,
    k: int,
    num_prompts: int,
    prompt_tokens: int,
    new_tokens: int,
    as_json: bool,
) -> None:
    """How far an honest device's split results sit from the TD's (audit deviation, Freivalds
    residual) on the bundled base's stand-in private model: what the per-device tolerances
    (tdllm/trusted/device_rounding.py) are set from."""
    import torch

    from tdllm.sources import open_checkpoint
    from tdllm_lab.bench.device_tolerance import format_tolerance_report, run_tolerance_bench
    from tdllm_lab.protection.private_model import stand_in_checkpoint

    kinds = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    chosen = [d.strip() for d in dtypes.split(",") if d.strip()]
    if not chosen or any(d not in kinds for d in chosen):
        raise click.BadParameter(f"choose from {', '.join(kinds)}", param_hint="--dtypes")
    checkpoint = stand_in_checkpoint(open_checkpoint("bundled"), k)
    report = run_tolerance_bench(
        checkpoint,
        device_list(devices),
        tuple(kinds[d] for d in chosen),
        k,
        num_prompts,
        prompt_tokens,
        new_tokens,
        status,
    )
    click.echo(json.dumps(report, indent=2) if as_json else format_tolerance_report(report))


@bench.command("transcript")
@click.option("--k", type=click.IntRange(1), default=DEFAULT_K, show_default=True)
@click.option("--new-tokens", type=click.IntRange(1, 256), default=8, show_default=True)
@CACHE_DIR
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def bench_transcript(k: int, new_tokens: int, cache_dir: Path | None, as_json: bool) -> None:
    """A digest of what split's, masked's and obfuscated's device saw and held in a fixed greedy
    run of the private fine-tune: equal digests on two commits mean the untrusted side observes
    nothing new (masked's fresh pads are counted, not hashed)."""
    from tdllm.sources import open_checkpoint
    from tdllm_lab.bench.transcript import format_report, run_transcript_bench
    from tdllm_lab.protection.private_cache import DEFAULT_CACHE, private_model_dir

    model = private_model_dir(cache_dir or DEFAULT_CACHE, k, log=status)
    report = run_transcript_bench(open_checkpoint(model), k, new_tokens, status)
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


@bench.command("fidelity")
@click.option(
    "--private",
    "private",
    is_flag=True,
    help="instead: the private fine-tune vs BASE on held-out general data (agreement, "
    "perplexity, private recall, private-name leaks); MODEL defaults to the cached one",
)
@click.option(
    "--model",
    default=None,
    help="the model to quantize [bundled]; with --private the fine-tune's directory",
)
@click.option("--base", default="bundled", show_default=True, help="its public base")
@click.option(
    "--new-tokens",
    type=click.IntRange(1, 512),
    default=None,
    help="greedy tokens [16; --private 32]",
)
@click.option(
    "--bf16-floor",
    is_flag=True,
    help="--private: also BASE in bf16 vs BASE, the agreement a rounding change leaves",
)
@click.option(
    "--quant",
    "quants",
    type=click.Choice([q for q in QUANTS if q != "none"]),
    multiple=True,
    help="instead: quantized QUANT (repeatable) in fp32 and bf16 against fp32 and bf16",
)
@click.option(
    "--masked-quant",
    "masked_quants",
    type=click.Choice([q for q in QUANTS if q != "none"]),
    multiple=True,
    help="also masked with QUANT (repeatable): its TD-held delta and lm_head quantized (a "
    "delta needs a MODEL that differs from BASE, e.g. a `tdllm finetune-tail` directory)",
)
@CACHE_DIR
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def bench_fidelity(
    private: bool,
    model: str | None,
    base: str,
    new_tokens: int | None,
    bf16_floor: bool,
    quants: tuple[str, ...],
    masked_quants: tuple[str, ...],
    cache_dir: Path | None,
    as_json: bool,
) -> None:
    """masked's quantization against the fp32 and bf16 models: perplexity on held-out text and
    greedy-token agreement over 8 prompts.

    With --private: does the private fine-tune (`tdllm finetune-tail`) keep BASE's general
    quality? Greedy-token agreement with BASE over 115 held-out general prompts, perplexity on
    held-out prose, recall of the private facts on held-out paraphrases, and the share of
    general answers that name a private fact (tdllm/protection/private_fidelity.py).
    """
    from tdllm.sources import open_checkpoint

    if private:
        _private_fidelity(model, base, new_tokens, bf16_floor, cache_dir, as_json)
        return
    if cache_dir is not None or bf16_floor:
        raise click.UsageError("--cache-dir and --bf16-floor need --private")
    if quants and masked_quants:
        raise click.UsageError("--masked-quant adds rows to masked's report, not to --quant's")
    if quants:
        from tdllm_lab.bench.quant_fidelity import measure_quant

        report = measure_quant(open_checkpoint(model or "bundled"), quants, new_tokens or 16)
    else:
        from tdllm_lab.protection.masked_fidelity import measure

        checkpoint = open_checkpoint(model or "bundled")
        report = measure(checkpoint, open_checkpoint(base), new_tokens or 16, masked_quants)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    base_name = f", base {report['base']}" if "base" in report else ""
    click.echo(f"model {report['model']}{base_name}, {report['threads']} threads")
    fp32 = report["perplexity"]["fp32"]
    for name, ppl in report["perplexity"].items():
        agree = report["greedy"].get(name, {})
        click.echo(
            f"{name:<12} perplexity {ppl:8.3f} ({100 * (ppl / fp32 - 1):+.2f}% vs fp32)  "
            f"greedy tokens = fp32: {100 * agree.get('token_agreement_vs_fp32', 0):5.1f}%  "
            f"identical continuations: {agree.get('identical_continuations', 0)}/"
            f"{report['prompts']}"
        )


def _private_fidelity(
    model: str | None,
    base: str,
    new_tokens: int | None,
    bf16_floor: bool,
    cache_dir: Path | None,
    as_json: bool,
) -> None:
    from tdllm.sources import open_checkpoint
    from tdllm_lab.protection.private_cache import DEFAULT_CACHE, private_model_dir
    from tdllm_lab.protection.private_fidelity import (
        NEW_TOKENS,
        format_private_report,
        measure_private,
    )

    if model is None:  # the project's private model, trained once into the cache
        model = str(private_model_dir(cache_dir or DEFAULT_CACHE, DEFAULT_K, log=status))
    report = measure_private(
        open_checkpoint(base),
        open_checkpoint(model),
        new_tokens=new_tokens or NEW_TOKENS,
        bf16_floor=bf16_floor,
    )
    click.echo(json.dumps(report, indent=2) if as_json else format_private_report(report))
