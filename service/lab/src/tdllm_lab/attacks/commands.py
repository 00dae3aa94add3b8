"""`tdllm attack NAME --profile P [--json]`: run one attack of the suite against a profile;
`tdllm attack --all [--write-docs docs/security.md]`: the whole suite, and its table."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import click

from tdllm.errors import UsageError
from tdllm.trusted.crossing import DEVICE_KINDS
from tdllm_lab.attacks.registry import ATTACKS, attack_names, runner
from tdllm_lab.attacks.result import AttackOptions


@click.command("attack")
@click.argument("name", required=False)
@click.option("--profile", help="protection profile to attack (not with --all)")
@click.option("--all", "run_all", is_flag=True, help="every attack on every profile it applies to")
@click.option(
    "--write-docs",
    type=click.Path(dir_okay=False, path_type=Path),
    help="with --all: rewrite this doc's attack-suite section with the results",
)
@click.option("--device", type=click.Choice(DEVICE_KINDS), default="cpu")
@click.option("--k", type=click.IntRange(1), default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quick", is_flag=True, help="fewer prompts and trials (smoke runs)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object (per attack run)")
def attack(
    name: str | None,
    profile: str | None,
    run_all: bool,
    write_docs: Path | None,
    device: str,
    k: int,
    seed: int,
    quick: bool,
    as_json: bool,
) -> None:
    """Run attack NAME (A1, A2, ...) on what the untrusted device of PROFILE held and saw."""
    if run_all:
        if name or profile:
            raise UsageError("--all runs every attack on its profiles: give no NAME or --profile")
        _suite(AttackOptions("all", device, seed, k, quick), write_docs, as_json)
        return
    if write_docs is not None:
        raise UsageError("--write-docs writes the whole suite's table: use it with --all")
    if not name or not profile:
        raise UsageError("give an attack NAME and --profile (or --all)")
    name = name.upper()
    if name not in ATTACKS:
        known = ", ".join(f"{n} ({ATTACKS[n][1]})" for n in attack_names()) or "none yet"
        raise UsageError(f"unknown attack {name!r}; known: {known}")
    options = AttackOptions(profile=profile, device=device, seed=seed, k=k, quick=quick)
    result = runner(name)(options)
    click.echo(json.dumps(result.to_json()) if as_json else result.line())


def _suite(options: AttackOptions, doc: Path | None, as_json: bool) -> None:
    from tdllm_lab.attacks.suite import SECTION, SUITE, format_section, run_suite
    from tdllm_lab.bench.machine import machine
    from tdllm_lab.doc_sections import read_marked, replace_marked

    if doc is not None:
        read_marked(doc, SECTION)  # before an hour of measuring, not after

    def progress(i: int, name: str, profile: str) -> None:
        click.echo(f"[{i + 1}/{len(SUITE)}] {name} against {profile} ...", err=True)

    rows = run_suite(SUITE, options, progress)
    for row in rows:
        click.echo(json.dumps(row.result.to_json()) if as_json else row.result.line())
    if doc is not None:
        flags = " --quick" if options.quick else ""
        command = f"tdllm attack --all{flags} --write-docs {doc}"
        replace_marked(doc, SECTION, format_section(rows, command, machine(), datetime.now(UTC)))
        click.echo(f"wrote the attack table into {doc}", err=True)
