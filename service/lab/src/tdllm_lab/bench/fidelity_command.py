"""`tdllm bench fidelity`: what a quantization or the private fine-tune costs in quality
(perplexity, greedy agreement; for the fine-tune also recall and leaks of the private facts)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tdllm.cli import status
from tdllm.model.quant_formats import QUANTS
from tdllm.profiles.options import DEFAULT_K
from tdllm_lab.protection.commands import CACHE_DIR


@click.command("fidelity")
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
