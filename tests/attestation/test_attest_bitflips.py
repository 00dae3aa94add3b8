"""§8.6 group 1: every single-bit flip of a real quote is rejected (strict framing + crypto)."""

from __future__ import annotations

import random

import pytest

from tdllm_attest.errors import AttestationError
from tdllm_attest.trust import TrustAnchor
from tdllm_attest.verify import verify_quote
from tests.attestation.attest_mutations import Vector

SAMPLED_FLIPS = 5000
SEED = 20251123


def _survivors(vec: Vector, anchor: TrustAnchor, flips: list[int]) -> list[int]:
    collateral = vec.collateral
    out = []
    for bit in flips:
        mutated = bytearray(vec.quote)
        mutated[bit // 8] ^= 1 << (bit % 8)
        try:
            verify_quote(bytes(mutated), collateral, now=vec.at, anchor=anchor)
        except AttestationError:
            continue
        out.append(bit)
    return out


@pytest.mark.parametrize("name", ["v4", "v5"])
def test_sampled_single_bit_flips_of_real_quotes_are_all_rejected(
    name: str, request: pytest.FixtureRequest, intel_anchor: TrustAnchor
) -> None:
    vec: Vector = request.getfixturevalue(name)
    flips = random.Random(SEED).sample(range(len(vec.quote) * 8), SAMPLED_FLIPS)  # noqa: S311
    survivors = _survivors(vec, intel_anchor, flips)
    assert survivors == [], [f"byte {b // 8:#x} bit {b % 8}" for b in survivors[:20]]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["v4", "v5"])
def test_every_single_bit_flip_of_real_quotes_is_rejected(
    name: str, request: pytest.FixtureRequest, intel_anchor: TrustAnchor
) -> None:
    vec: Vector = request.getfixturevalue(name)
    survivors = _survivors(vec, intel_anchor, list(range(len(vec.quote) * 8)))
    assert survivors == [], [f"byte {b // 8:#x} bit {b % 8}" for b in survivors[:20]]
