"""Shared fixtures and hardware markers.

`gpu` and `tdx` tests run only when the hardware is present AND the opt-in flag is given
(--run-gpu / --run-tdx); otherwise they are skipped with the reason.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
TDX_VECTORS = SHARED / "testvectors" / "tdx"
TSM_REPORT = Path("/sys/kernel/config/tsm/report")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-gpu", action="store_true", help="run tests marked gpu")
    parser.addoption("--run-tdx", action="store_true", help="run tests marked tdx")


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    have = {
        "gpu": (config.getoption("--run-gpu") and _has_gpu(), "needs an NVIDIA GPU and --run-gpu"),
        "tdx": (
            config.getoption("--run-tdx") and TSM_REPORT.is_dir(),
            "needs a TDX guest and --run-tdx",
        ),
    }
    for item in items:
        for marker, (ok, reason) in have.items():
            if marker in item.keywords and not ok:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tdx_vectors() -> Path:
    """Real TDX quotes and collateral from ../shared (never copied into the repo)."""
    if not TDX_VECTORS.is_dir():
        pytest.skip(f"test vectors not found at {TDX_VECTORS}")
    return TDX_VECTORS


@pytest.fixture(scope="session")
def bundled_checkpoint():  # type: ignore[no-untyped-def]
    """The bundled SmolLM2-135M-Instruct, opened once per test session."""
    from tdllm.sources import open_checkpoint

    return open_checkpoint("bundled")


@pytest.fixture(scope="session")
def bundled_fp32(bundled_checkpoint):  # type: ignore[no-untyped-def]
    """(model, checkpoint) for the bundled model in fp32, loaded once per test session."""
    import torch

    from tdllm.model.loader import load_model

    return load_model(bundled_checkpoint, torch.float32)


@pytest.fixture(scope="session")
def finetuned_k2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real private model: `tdllm finetune-tail --k 2` (DEFAULT_STEPS, the distill recipe)
    of the bundled base, run once per session (~3 minutes on a quiet 2-core box; only `slow`
    tests ask for it).

    A development loop may reuse one already built (training is deterministic):
    TDLLM_TEST_FINETUNED_K2=.tdllm/private-models/zorblax-k2-r2-steps40-seed0 (copied, not
    touched).
    """
    import os

    from click.testing import CliRunner

    from tdllm.cli import cli
    from tdllm_lab.protection.private_cache import DEFAULT_STEPS, entry_name

    # laid out as a private-model cache entry, so `--cache-dir` of protect/bench reuses it
    out = tmp_path_factory.mktemp("private-models") / entry_name(2, DEFAULT_STEPS, 0)
    prebuilt = os.environ.get("TDLLM_TEST_FINETUNED_K2")
    if prebuilt:
        shutil.copytree(prebuilt, out)
        return out
    args = ["finetune-tail", "--base", "bundled", "--k", "2", "--steps", str(DEFAULT_STEPS)]
    args += ["--out"]
    result = CliRunner().invoke(cli, [*args, str(out)])
    assert result.exit_code == 0, result.output
    print(result.output)  # timings and held-out answers, shown with `pytest -s`
    return out
