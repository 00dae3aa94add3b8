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
    from tdllm.model.checkpoint import open_checkpoint

    return open_checkpoint("bundled")


@pytest.fixture(scope="session")
def bundled_fp32(bundled_checkpoint):  # type: ignore[no-untyped-def]
    """(model, checkpoint) for the bundled model in fp32, loaded once per test session."""
    import torch

    from tdllm.model.loader import load_model

    return load_model(bundled_checkpoint, torch.float32)
