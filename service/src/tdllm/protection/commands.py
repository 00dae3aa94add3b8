"""Click commands of the protection package: `tdllm prepare`, `tdllm finetune-tail` and
`tdllm bench split`."""

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


@click.command("finetune-tail")
@click.option("--base", default="bundled", show_default=True, help="the public base model")
@click.option(
    "--k",
    type=click.IntRange(1),
    default=DEFAULT_K,
    show_default=True,
    help="tail layers to train (everything before them stays BASE's, bit for bit)",
)
@click.option("--steps", type=click.IntRange(1), default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lr", type=click.FloatRange(0.0, min_open=True), default=3e-4, show_default=True)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True)
def finetune_tail(base: str, k: int, steps: int, seed: int, lr: float, out: Path) -> None:
    """Make a private model: fine-tune BASE's last K blocks and an untied lm_head on the
    generated Zorblax Dynamics data; write it to OUT as a model directory.

    The prefix is frozen and run once to cache its hidden states; only the tail trains.
    Then `tdllm prepare --base BASE --model OUT --k K` accepts OUT.
    """
    from tdllm.model.checkpoint import open_checkpoint
    from tdllm.protection.finetune import TrainConfig
    from tdllm.protection.finetune import finetune_tail as run

    config = TrainConfig(k=k, steps=steps, seed=seed, lr=lr)
    report, answers = run(open_checkpoint(base), out, config, _status)
    click.echo(
        f"wrote {out}: prefix cached in {report.prefix_seconds:.1f}s, {steps} steps in "
        f"{report.train_seconds:.1f}s; held-out loss {report.held_out_loss_before:.3f} -> "
        f"{report.held_out_loss_after:.3f}"
    )
    known = sum(fact.key in answer for _, fact, answer in answers)
    click.echo(f"held-out questions answered with the private fact: {known}/{len(answers)}")
    for question, _, answer in answers:
        click.echo(f"  {question} -> {answer}")


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
