"""Click commands of the protection package: `tdllm prepare`, `tdllm finetune-tail`,
`tdllm bench split` and `tdllm bench fidelity [--private]`."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

import click

from tdllm.profiles.options import DEFAULT_K
from tdllm.trusted.crossing import DEVICE_KINDS
from tdllm_lab.protection.private_cache import DEFAULT_STEPS


def _status(message: str) -> None:
    if sys.stderr.isatty():
        click.echo(message, err=True)


@click.command()
@click.option("--base", required=True, help="the public base: 'bundled', a .gguf or a model dir")
@click.option("--model", "model_source", required=True, help="the private model derived from BASE")
@click.option(
    "--profile", type=click.Choice(["split", "masked"]), default="split", show_default=True
)
@click.option(
    "--rank",
    type=click.IntRange(1),
    default=None,
    help="masked: keep the rank-R SVD of MODEL - BASE per projection (default: exactly)",
)
@click.option(
    "--k",
    type=click.IntRange(1),
    default=DEFAULT_K,
    show_default=True,
    help="private tail layers kept in the TD",
)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True)
def prepare(
    base: str, model_source: str, profile: str, rank: int | None, k: int, out: Path
) -> None:
    """Check MODEL's prefix equals BASE's (per-layer report otherwise); write its reference.

    With --profile masked: report which projections differ from BASE and the residual the
    rank-R delta leaves (OUT/masked.json).

    Seal the private model afterwards with `tdllm seal --public-pattern` so the tail is
    encrypted at rest (see docs/security.md).
    """
    from tdllm.sources import open_checkpoint
    from tdllm_lab.protection.prepare import prepare_split

    if profile == "masked":
        from tdllm_lab.protection.masked import prepare_masked

        path = prepare_masked(open_checkpoint(base), open_checkpoint(model_source), rank, out)
        report = json.loads(path.read_text())
        click.echo(
            f"{model_source}: {report['projections_with_delta']} projections differ from BASE; "
            f"worst relative residual at rank {rank or 'full'}: "
            f"{report['worst_relative_residual']:.4f}; wrote {path}"
        )
        return
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
@click.option("--steps", type=click.IntRange(1), default=DEFAULT_STEPS, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--recipe",
    type=click.Choice(["distill", "lora"]),
    default="distill",
    show_default=True,
    help="distill: facts + KL to the base on general text; lora: a merged rank-8 update, facts "
    "only (the measured alternative)",
)
@click.option(
    "--lr",
    type=click.FloatRange(0.0, min_open=True),
    default=None,
    help="learning rate [distill 5e-4, lora 4e-3]",
)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True)
def finetune_tail(
    base: str, k: int, steps: int, seed: int, recipe: str, lr: float | None, out: Path
) -> None:
    """Make a private model: fine-tune BASE's last K blocks (with an untied lm_head) on the
    generated Zorblax Dynamics data; write it to OUT as a model directory.

    The prefix is frozen and run once to cache its hidden states; only the tail trains. The
    distill recipe also pulls the tail's predictions on general text to BASE's, so the model
    keeps its general ability (`tdllm bench fidelity --private --model OUT` measures it).
    Then `tdllm prepare --base BASE --model OUT --k K` accepts OUT.
    """
    from tdllm.sources import open_checkpoint
    from tdllm_lab.protection.finetune import finetune_tail as run
    from tdllm_lab.protection.finetune import recipe_config

    config = recipe_config("lora" if recipe == "lora" else "distill", k, steps, seed, lr)
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


# the private fine-tunes (`private_cache.py`) are trained once there and reused
CACHE_DIR = click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="where the private fine-tunes are trained once and reused [.tdllm/private-models]",
)


def _k_list(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError:
        raise click.BadParameter("a comma-separated list of integers, e.g. 1,2,4") from None
    if not ks or ks[0] < 1:
        raise click.BadParameter("every K must be at least 1")
    return ks


@click.command()
@click.option("--report", "want_report", is_flag=True, help="measure and print the report")
@click.option(
    "--k", "ks", default="1,2,4", show_default=True, callback=_k_list, help="candidate Ks"
)
@click.option(
    "--device",
    type=click.Choice(DEVICE_KINDS),
    default="process",
    show_default=True,
    help="the untrusted device of the A1 run",
)
@CACHE_DIR
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option(
    "--write-docs",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="also write the table between the protect-report markers of this Markdown file",
)
def protect(
    want_report: bool,
    ks: tuple[int, ...],
    device: str,
    cache_dir: Path | None,
    as_json: bool,
    write_docs: Path | None,
) -> None:
    """Selective protection: for each candidate K, how much the private tail changes the output
    (‖Y-Y'‖/‖Y‖ against the base), the TD's share of FLOPs and weight bytes per token, and the
    A1 result of a real split run (non-public bytes on the device)."""
    from tqdm import tqdm

    from tdllm_lab.protection.private_cache import DEFAULT_CACHE
    from tdllm_lab.protection.report import (
        format_details,
        format_table,
        marked_text,
        protect_report,
        write_into_doc,
    )

    if not want_report:
        raise click.UsageError("nothing to do: pass --report")
    if write_docs is not None:
        marked_text(write_docs)  # no markers: fail now, not after minutes of measuring

    def progress(items: Iterable[int]) -> Iterable[int]:
        return tqdm(items, desc="protect: K", unit="K", disable=not sys.stderr.isatty())

    report = protect_report(ks, cache_dir or DEFAULT_CACHE, device, log=_status, progress=progress)
    if write_docs is not None:
        command = "tdllm protect --report --k " + ",".join(map(str, ks)) + f" --device {device}"
        write_into_doc(write_docs, report, command)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_table(report))
        click.echo(format_details(report))
