"""Recipient key pairs and a sealing helper for the sealing tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tdllm.model import loader
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.transformer import Transformer
from tdllm.sealing.recipients import load_public_key, write_key_pair
from tdllm_lab.sealing.writer import seal_checkpoint

from .synthetic import SMALL_CHUNK, Sealer, synthetic_checkpoint


@pytest.fixture(scope="session")
def recipient(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(public key file, private key file) of an X25519 recipient."""
    return write_key_pair(tmp_path_factory.mktemp("keys") / "owner", "X25519")


@pytest.fixture(scope="session")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A second X25519 recipient that no test model is sealed to."""
    return write_key_pair(tmp_path_factory.mktemp("keys") / "stranger", "X25519")


@pytest.fixture
def seal_tiny(tmp_path: Path, recipient: tuple[Path, Path]) -> Sealer:
    """Seal a synthetic checkpoint into a fresh directory under tmp_path and return it."""
    counter = iter(range(1_000_000))

    def seal(checkpoint: Checkpoint | None = None, **options: Any) -> Path:
        out = tmp_path / f"sealed-{next(counter)}"
        options.setdefault("chunk_size", SMALL_CHUNK)
        if "data_key" not in options:
            options.setdefault("recipients", [load_public_key(recipient[0])])
        seal_checkpoint(checkpoint or synthetic_checkpoint(), out, **options)
        return out

    return seal


@pytest.fixture
def loaded_models(monkeypatch: pytest.MonkeyPatch) -> list[Transformer]:
    """Every model `load_model` builds in the test, kept for inspection after a failed load
    (which returns nothing): what its scrub left in the model's memory."""
    built: list[Transformer] = []

    class Recording(Transformer):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            built.append(self)

    monkeypatch.setattr(loader, "Transformer", Recording)
    return built
