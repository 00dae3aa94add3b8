"""Fixtures for the attestation tests: the real vectors (read from ../shared, never copied)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tdllm_attest.trust import TrustAnchor
from tdllm_attest.verify import VerifiedQuote, verify_quote
from tests.attestation.attest_mutations import (
    SPR_E4_AT,
    V4_AT,
    V5_AT,
    Vector,
)


@pytest.fixture
def quiet_simulated_warnings() -> Iterator[None]:
    """Simulated mode warns on every quote by design; tests that make many mute it."""
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


@pytest.fixture(scope="session")
def intel_anchor() -> TrustAnchor:
    return TrustAnchor.intel()


def _vector(root: Path, quote: str, collateral: str, at: datetime) -> Vector:
    return Vector(quote, (root / quote).read_bytes(), root / collateral, at)


@pytest.fixture(scope="session")
def v4(tdx_vectors: Path) -> Vector:
    return _vector(
        tdx_vectors, "dcapqvl_tdx_quote_v4.bin", "dcapqvl_tdx_quote_v4_collateral.json", V4_AT
    )


@pytest.fixture(scope="session")
def v5(tdx_vectors: Path) -> Vector:
    return _vector(
        tdx_vectors,
        "gotdxguest_quote_v5_sample.bin",
        "dcapqvl_fmspc90C06F_collateral_2026-02.json",
        V5_AT,
    )


@pytest.fixture(scope="session")
def v5_no_tcb_match(tdx_vectors: Path) -> Vector:
    return _vector(
        tdx_vectors,
        "dcapqvl_tdx_quote_v5_no_tcb_match.bin",
        "dcapqvl_fmspc90C06F_collateral_2026-02.json",
        V5_AT,
    )


@pytest.fixture(scope="session")
def spr_e4(tdx_vectors: Path) -> Vector:
    return _vector(
        tdx_vectors,
        "gotdxguest_tdx_quote_v4_spr_e4.bin",
        "gotdxguest_spr_e4_collateral_2023-06.json",
        SPR_E4_AT,
    )


@pytest.fixture(scope="session")
def cos113_quote(tdx_vectors: Path) -> bytes:
    return (tdx_vectors / "gotdxguest_cos113_quote_v4.bin").read_bytes()


@pytest.fixture(scope="session")
def verified_v4(v4: Vector, intel_anchor: TrustAnchor) -> VerifiedQuote:
    return verify_quote(v4.quote, v4.collateral, now=v4.at, anchor=intel_anchor)


@pytest.fixture(scope="session")
def verified_v5(v5: Vector, intel_anchor: TrustAnchor) -> VerifiedQuote:
    return verify_quote(v5.quote, v5.collateral, now=v5.at, anchor=intel_anchor)
