"""`--pccs URL [--cache-dir DIR]` / `--collateral FILE`: the one place the command lines
(tdllm-verify, tdllm-verify receipt, tdllm-chat) turn these options into a collateral source."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

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


@contextmanager
def own_collateral(
    pccs_url: str | None,
    cache_dir: Path | None,
    collateral_file: Path | None,
    now: Callable[[], datetime] = system_clock,
) -> Iterator[CollateralSource | None]:
    """The caller's own collateral source, or None (use the collateral the service served)."""
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
