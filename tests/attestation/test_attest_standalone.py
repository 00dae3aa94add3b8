"""`tdllm-verify` works from a venv holding only tdllm-attest and its pinned deps (no torch).

Slow (~20-30 s: a fresh venv and a pip install from PyPI or pip's cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tdllm_attest import errors
from tests.attestation.attest_mutations import Vector

REPO = Path(__file__).resolve().parents[2]
V4_AT = "2025-06-19T12:00:00Z"


def _run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=False, env=env, timeout=600
    )


@pytest.mark.slow
def test_tdllm_verify_runs_from_a_venv_with_only_tdllm_attest_installed(
    tmp_path: Path, tdx_vectors: Path, v4: Vector
) -> None:
    venv = tmp_path / "venv"
    made = _run(sys.executable, "-m", "venv", venv)
    assert made.returncode == 0, made.stderr
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    py, exe = venv / "bin" / "python", venv / "bin" / "tdllm-verify"
    installed = _run(
        py,
        "-m",
        "pip",
        "install",
        "-q",
        "-c",
        REPO / "service" / "constraints.txt",
        REPO / "attestation",
        env=env,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr

    no_torch = _run(py, "-c", "import torch", env=env)
    assert no_torch.returncode != 0
    assert "No module named 'torch'" in no_torch.stderr
    no_tdllm = _run(py, "-c", "import tdllm", env=env)
    assert no_tdllm.returncode != 0

    ok = _run(
        exe, tdx_vectors / v4.name, "--collateral", v4.collateral_path, "--at", V4_AT, env=env
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "RESULT: PASS" in ok.stdout

    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(v4.quote[:1000])
    bad = _run(exe, truncated, "--collateral", v4.collateral_path, "--at", V4_AT, env=env)
    assert bad.returncode == errors.EXIT_PARSE
    assert "Traceback" not in bad.stdout + bad.stderr
    failures = [line for line in bad.stdout.splitlines() if line.startswith("[FAIL]")]
    assert failures == [
        "[FAIL] quote framing: signature data length 4300 runs past the end of the quote "
        "(1000 bytes)"
    ]
    assert "RESULT: FAIL (QuoteParseError, exit 3)" in bad.stdout
