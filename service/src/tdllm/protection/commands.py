"""Click commands of the protection package: `tdllm prepare` and `tdllm bench split`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tdllm.protection.profiles import DEFAULT_K


def _status(message: str) -> None:
    if sys.stderr.isatty():
        click.echo(message, err=True)


@click.command()
@click.option("--base", required=True, help="the public base: 'bundled', a .gguf or a model dir")
@click.option("--model", "model_source", required=True, help="the private model derived from BASE")
@click.option("--profile", type=click.Choice(["split"]), default="split", show_default=True)
@click.option(
    "--k",
    type=click.IntRange(1),
    default=DEFAULT_K,
    show_default=True,
    help="private tail layers kept in the TD",
)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True)
def prepare(base: str, model_source: str, profile: str, k: int, out: Path) -> None:
    """Check MODEL's prefix equals BASE's (per-layer report otherwise); write its reference.

    Seal the private model afterwards with `tdllm seal --public-pattern` so the tail is
    encrypted at rest (see docs/security.md).
    """
    from tdllm.model.checkpoint import open_checkpoint
    from tdllm.protection.prepare import prepare_split

    written = prepare_split(open_checkpoint(base), open_checkpoint(model_source), k, out)
    click.echo(f"{model_source}: layers 0..L-{k}-1 and the embedding are BASE's; wrote {written}")


@click.command("split")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--k", type=click.IntRange(1), default=DEFAULT_K, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option("--new-tokens", type=click.IntRange(2, 4096), default=32, show_default=True)
@click.option("--repeats", type=click.IntRange(1, 50), default=3, show_default=True)
def bench_split(as_json: bool, k: int, prompt_tokens: int, new_tokens: int, repeats: int) -> None:
    """td-only vs split (cpu and process devices): tokens/s and crossing bytes per token."""
    from tdllm.protection.bench import format_split_report, run_split_bench

    report = run_split_bench(k, prompt_tokens, new_tokens, repeats, _status)
    click.echo(json.dumps(report, indent=2) if as_json else format_split_report(report))
