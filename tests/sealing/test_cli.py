"""`tdllm keygen`, `tdllm seal` and `tdllm generate --key` as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tdllm.model.checkpoint import save_hf_directory

from .synthetic import synthetic_checkpoint

TDLLM = str(Path(sys.executable).with_name("tdllm"))


def tdllm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TDLLM, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    save_hf_directory(synthetic_checkpoint(seed=31), folder)
    return folder


@pytest.mark.e2e
def test_keygen_seal_and_generate_with_the_key_match_the_plain_model(
    tmp_path: Path, plain_dir: Path
) -> None:
    assert tdllm("keygen", "--out", tmp_path / "owner").returncode == 0
    sealed = tmp_path / "sealed"
    result = tdllm(
        "seal", plain_dir, "--out", sealed, "--recipient", tmp_path / "owner.pub", "--key-id", "m/1"
    )
    assert result.returncode == 0, result.stderr
    assert "key id m/1" in result.stdout
    prompt = ("hello world", "--temperature", "0", "--max-tokens", "8")
    plain = tdllm("generate", *prompt, "--model", plain_dir)
    unsealed = tdllm("generate", *prompt, "--model", sealed, "--key", tmp_path / "owner.key")
    assert plain.returncode == unsealed.returncode == 0, unsealed.stderr
    assert unsealed.stdout == plain.stdout
    stranger = tmp_path / "stranger"
    assert tdllm("keygen", "--out", stranger, "--curve", "P-384").returncode == 0
    denied = tdllm("generate", *prompt, "--model", sealed, "--key", f"{stranger}.key")
    line = assert_one_line_error(denied, 3)
    assert "cannot unseal manifest" in line


def test_seal_without_a_recipient_is_refused(tmp_path: Path, plain_dir: Path) -> None:
    result = tdllm("seal", plain_dir, "--out", tmp_path / "sealed")
    assert "recipient" in assert_one_line_error(result, 2)
    assert not (tmp_path / "sealed").exists()


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    assert tdllm("keygen", "--out", tmp_path / "k").returncode == 0
    assert "exists" in assert_one_line_error(tdllm("keygen", "--out", tmp_path / "k"), 2)
