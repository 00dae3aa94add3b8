"""Remembered parsing/signature results never stand in for time-dependent or failed checks."""

from __future__ import annotations

import functools
from datetime import timedelta

import pytest

from tdllm_attest import memo
from tdllm_attest.collateral import FreshnessLimits, load_collateral
from tdllm_attest.errors import AttestationError, CollateralError
from tdllm_attest.trust import TrustAnchor
from tdllm_attest.verify import verify_quote
from tests.attestation.attest_mutations import Vector


def test_a_warm_cache_still_rejects_the_same_evidence_at_a_later_time(
    v4: Vector, intel_anchor: TrustAnchor
) -> None:
    collateral = load_collateral(v4.collateral_path)
    verify_quote(v4.quote, collateral, now=v4.at, anchor=intel_anchor)
    with pytest.raises(AttestationError):
        verify_quote(v4.quote, collateral, now=v4.at + timedelta(days=3650), anchor=intel_anchor)


def test_a_warm_cache_still_applies_a_stricter_freshness_limit(
    v4: Vector, intel_anchor: TrustAnchor
) -> None:

    collateral = load_collateral(v4.collateral_path)
    verify_quote(v4.quote, collateral, now=v4.at, anchor=intel_anchor)
    with pytest.raises(CollateralError, match="freshness"):
        verify_quote(
            v4.quote,
            collateral,
            now=v4.at,
            anchor=intel_anchor,
            limits=FreshnessLimits(max_age=timedelta(seconds=1)),
        )


def test_failures_are_not_remembered_and_the_cache_is_bounded() -> None:
    cache: memo.BoundedCache[int, int] = memo.BoundedCache(maxsize=2)
    calls: list[int] = []

    def failing() -> int:
        calls.append(1)
        raise ValueError("bad")

    for _ in range(2):
        with pytest.raises(ValueError, match="bad"):
            cache.get_or_compute(0, failing)
    assert len(calls) == 2
    for key in (0, 1, 2):
        assert cache.get_or_compute(key, functools.partial(int, key * 10)) == key * 10
    assert len(cache) == 2
    assert cache.get_or_compute(0, lambda: -1) == -1  # evicted, recomputed
