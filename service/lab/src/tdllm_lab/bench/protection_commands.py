"""`tdllm bench split`, `tolerance` and `transcript`: what the protection profiles cost, how far
an honest device sits from the TD, and what the untrusted side observes."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tdllm.cli import QUANT, status
from tdllm.profiles.options import DEFAULT_K
from tdllm_lab.protection.commands import CACHE_DIR


@click.command("split")
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


@click.command("tolerance")
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


@click.command("transcript")
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
