"""image/build.sh refuses bad arguments with one `error:` line, before touching anything."""

from __future__ import annotations

import subprocess

import pytest

from tests.image.conftest import IMAGE_DIR


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "staging"], "error: profile must be prod, dev or smoke, not 'staging'\n"),
        (["--fast"], "error: unknown argument '--fast' (see image/build.sh --help)\n"),
    ],
)
def test_build_rejects_bad_arguments_with_one_line(args: list[str], message: str) -> None:
    result = subprocess.run(
        [IMAGE_DIR / "build.sh", *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 1
    assert result.stderr == message
    assert not (IMAGE_DIR / "out" / "staging").exists()
