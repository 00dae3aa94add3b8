"""The shipped benchmark runs and reports the numbers docs/performance.md quotes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tdllm_attest import bench
from tdllm_attest.trust import ALLOW_SIMULATED_ENV
from tests.attestation.attest_mutations import Vector


def test_bench_reports_verify_and_release_medians_on_the_real_v4_vector(
    v4: Vector,
    tdx_vectors: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(ALLOW_SIMULATED_ENV, "1")
    quote, at = str(tdx_vectors / v4.name), v4.at.isoformat()
    args = ["--quote", quote, "--collateral", str(v4.collateral_path), "--at", at]
    assert bench.main([*args, "-n", "3", "--releases", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verify_median_ms"] > 0
    for source in ("", "pccs_cold_", "pccs_cached_"):
        assert result[f"release_{source}median_ms"] > 0


def test_bench_skips_the_simulated_release_without_the_switch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(ALLOW_SIMULATED_ENV, raising=False)
    assert bench.main(["-n", "2", "--json"]) == 0
    captured = capsys.readouterr()
    assert "release_median_ms" not in json.loads(captured.out)
    assert ALLOW_SIMULATED_ENV in captured.err
