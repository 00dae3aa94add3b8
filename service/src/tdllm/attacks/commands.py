"""`tdllm attack NAME --profile P [--json]`: run one attack of the suite against a profile."""

from __future__ import annotations

import json

import click

from tdllm.attacks.registry import ATTACKS, attack_names, runner
from tdllm.attacks.result import AttackOptions
from tdllm.errors import UsageError


@click.command("attack")
@click.argument("name")
@click.option("--profile", required=True, help="protection profile to attack")
@click.option("--device", type=click.Choice(["cpu", "process", "cuda"]), default="cpu")
@click.option("--k", type=click.IntRange(1), default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quick", is_flag=True, help="fewer prompts and trials (smoke runs)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def attack(
    name: str, profile: str, device: str, k: int, seed: int, quick: bool, as_json: bool
) -> None:
    """Run attack NAME (A1, A2, ...) on what the untrusted device of PROFILE held and saw."""
    name = name.upper()
    if name not in ATTACKS:
        known = ", ".join(f"{n} ({ATTACKS[n][1]})" for n in attack_names()) or "none yet"
        raise UsageError(f"unknown attack {name!r}; known: {known}")
    options = AttackOptions(profile=profile, device=device, seed=seed, k=k, quick=quick)
    result = runner(name)(options)
    click.echo(json.dumps(result.to_json()) if as_json else result.line())
