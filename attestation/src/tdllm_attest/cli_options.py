"""What the relying party's command lines (tdllm-verify, tdllm-verify receipt, tdllm-chat) share:
`--pccs URL [--cache-dir DIR]` / `--collateral FILE` turned into a collateral source, and the
reference values a TD is checked against (`--policy/--policy-key`, or `--insecure-any-td`),
refused before any network when missing or contradictory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from tdllm_attest.collateral import CollateralSource, FileCollateralSource
from tdllm_attest.pccs import (
    CollateralCache,
    PccsClient,
    PccsCollateralSource,
    RetryPolicy,
    default_cache_dir,
    system_clock,
)

PCCS_RETRY = RetryPolicy()  # tries and backoff for --pccs (tests replace the sleep)


def pccs_source(
    pccs_url: str, cache_dir: Path | None, now: Callable[[], datetime] = system_clock
) -> PccsCollateralSource:
    """A cached PCCS source (cache: --cache-dir, else ~/.cache/tdllm/collateral); a bad URL is
    a usage error on --pccs."""
    try:
        client = PccsClient(pccs_url, retry=PCCS_RETRY)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--pccs") from None
    cache = CollateralCache(cache_dir if cache_dir is not None else default_cache_dir())
    return PccsCollateralSource(client, cache, now=now)


_FILE = click.Path(path_type=Path, dir_okay=False, exists=True)


def own_collateral_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--pccs / --cache-dir / --collateral: collateral of the caller's own instead of the one the
    service (its host) serves; read with `own_collateral`."""
    options = (
        click.option(
            "--pccs",
            "pccs_url",
            metavar="URL",
            help="verify with collateral from this PCCS / Intel PCS, not the one the service "
            "serves (which comes through its host)",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(path_type=Path, file_okay=False),
            help="on-disk collateral cache for --pccs (default ~/.cache/tdllm/collateral)",
        ),
        click.option(
            "--collateral",
            "collateral_file",
            type=_FILE,
            help="verify with the collateral in this file (dcap-qvl JSON layout)",
        ),
    )
    for option in reversed(options):
        command = option(command)
    return command


def reference_value_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--policy / --policy-key / --insecure-any-td; checked with `check_reference_options`."""
    options = (
        click.option(
            "--policy",
            "policy_file",
            type=_FILE,
            help="signed reference-values policy (tdllm-attest-policy/1) the TD must satisfy",
        ),
        click.option("--policy-key", type=_FILE, help="Ed25519 public key (PEM) of --policy"),
        click.option(
            "--insecure-any-td",
            is_flag=True,
            help="INSECURE: accept any TD on genuine hardware without checking its measurements",
        ),
    )
    for option in reversed(options):
        command = option(command)
    return command


def check_reference_options(
    policy_file: Path | None, policy_key: Path | None, insecure_any_td: bool
) -> None:
    """Fail closed before any network: a TD is checked against signed reference values unless
    the caller says, loudly, that any TD will do; missing halves and contradictions refused."""
    if (policy_file is None) != (policy_key is None):
        raise click.UsageError("--policy and --policy-key must be given together")
    if policy_file is not None and insecure_any_td:
        raise click.UsageError("--insecure-any-td contradicts --policy: give one of them")
    if policy_file is None and not insecure_any_td:
        raise click.UsageError(
            "no reference values to check the TD against: give --policy FILE --policy-key "
            "PUB.pem (or --insecure-any-td to accept any TD)"
        )


def check_collateral_options(
    pccs_url: str | None, cache_dir: Path | None, collateral_file: Path | None
) -> None:
    """At most one own collateral source, and --cache-dir only with --pccs (before any work)."""
    if pccs_url is not None and collateral_file is not None:
        raise click.UsageError("give at most one of --pccs URL or --collateral FILE")
    if cache_dir is not None and pccs_url is None:
        raise click.UsageError("--cache-dir is only used with --pccs")


@contextmanager
def own_collateral(
    pccs_url: str | None,
    cache_dir: Path | None,
    collateral_file: Path | None,
    now: Callable[[], datetime] = system_clock,
) -> Iterator[CollateralSource | None]:
    """The caller's own collateral source, or None (use the collateral the service served);
    the options were checked first (`check_collateral_options`)."""
    if collateral_file is not None:
        yield FileCollateralSource(collateral_file)
        return
    if pccs_url is None:
        yield None
        return
    source = pccs_source(pccs_url, cache_dir, now)
    try:
        yield source
    finally:
        source.client.close()
