"""`tdllm` as a user runs it: answers on stdout, every mistake as one clear line and exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TDLLM = str(Path(sys.executable).with_name("tdllm"))
pytestmark = pytest.mark.e2e


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TDLLM, *args], input=stdin, capture_output=True, text=True, timeout=300, check=False
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], expected: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert expected in lines[0]


def test_chat_generation_answers_the_question() -> None:
    proc = run("generate", "--chat", "What is the capital of France?", "--temperature", "0",
               "--max-tokens", "12")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_rejects_empty_prompt() -> None:
    assert_one_line_error(run("generate", "   "), "prompt is empty")


def test_rejects_prompt_longer_than_the_context() -> None:
    long_prompt = "word " * 9000  # about 9,000 tokens; the bundled model's context is 8,192
    assert_one_line_error(run("generate", "-", stdin=long_prompt), "context is 8192")


def test_rejects_unknown_dtype() -> None:
    assert_one_line_error(run("generate", "hi", "--dtype", "fp16"), "fp16")


def test_rejects_missing_model_file(tmp_path: Path) -> None:
    assert_one_line_error(
        run("generate", "hi", "--model", str(tmp_path / "nope.gguf")), "not found"
    )


def test_rejects_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    assert_one_line_error(run("generate", "hi", "--model", str(junk)), "not a readable GGUF")


def test_rejects_out_of_range_temperature() -> None:
    assert_one_line_error(run("generate", "hi", "--temperature", "3"), "temperature")


def test_doctor_reports_cpu_torch_and_tdx_guest() -> None:
    proc = run("doctor")
    assert proc.returncode == 0
    for key in ("cpu features", "torch", "oneDNN", "avx512 kernels", "ipex", "tdx guest"):
        assert key in proc.stdout
