"""tdllm-attest stands alone: `tdllm-verify`, the client SDK and `tdllm-chat` need no torch.

The venv test is slow (~20-30 s: a fresh venv and a pip install from PyPI or pip's cache); the
import check runs in this venv, where torch is installed but must not be loaded.
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
# what a user's `pip install tdllm-attest` lacks: the service, torch, and the [broker] extra
NOT_INSTALLED = ("tdllm", "torch", "numpy", "flask", "werkzeug", "jwcrypto")
LOADED_AFTER_HELP = f"""
import sys
import tdllm_attest.client
from tdllm_attest.client.chat_cli import chat
chat.main(["--help"], prog_name="tdllm-chat", standalone_mode=False)
print(sorted({{m.split(".")[0] for m in sys.modules}} & set({NOT_INSTALLED!r})))
"""


def _run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=False, env=env, timeout=600
    )


def test_the_client_sdk_and_tdllm_chat_load_neither_torch_nor_the_service() -> None:
    done = _run(sys.executable, "-c", LOADED_AFTER_HELP)
    assert done.returncode == 0, done.stderr
    assert "--pccs URL" in done.stdout and "TDLLM_API_KEY" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


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

    help_text = _run(venv / "bin" / "tdllm-chat", "--help", env=env)
    assert help_text.returncode == 0, help_text.stderr
    assert "--policy-key" in help_text.stdout and "--pccs" in help_text.stdout
    sdk = _run(py, "-c", "from tdllm_attest.client import E2eClient, verify_attestation", env=env)
    assert sdk.returncode == 0, sdk.stderr
    refused = _run(venv / "bin" / "tdllm-chat", "--e2e", "http://127.0.0.1:9", "hi", env=env)
    assert refused.returncode == 2 and refused.stderr.startswith("error: no reference values")
