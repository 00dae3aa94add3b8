"""A tiny public base, a "private" model derived from it, and split/td-only builders."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tdllm.model.checkpoint import Checkpoint
from tdllm.model.config import ModelConfig
from tdllm.model.loader import load_model
from tdllm.model.transformer import Transformer
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.public_reference import PublicReference
from tdllm.trusted.split import offload_public_prefix
from tdllm_lab.protection.private_model import privatize
from tests.tiny_model import TINY, tiny_tensors

K = 2
CFG: ModelConfig = dataclasses.replace(TINY, num_layers=4, tie_word_embeddings=False)
MAX_BATCH, MAX_SEQ = 4, 48


def checkpoint_of(
    name: str, tensors: dict[str, torch.Tensor], cfg: ModelConfig = CFG
) -> Checkpoint:
    return Checkpoint(name, Path(name), cfg, None, lambda: iter(tensors.items()))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def base_tensors() -> dict[str, torch.Tensor]:
    return tiny_tensors(CFG, seed=3)


@pytest.fixture(scope="session")
def private_tensors(base_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return privatize(base_tensors.items(), CFG, K, seed=1)


@pytest.fixture(scope="session")
def reference(base_tensors: dict[str, torch.Tensor]) -> PublicReference:
    return PublicReference.build("tiny-base", base_tensors.items())


@pytest.fixture
def private_checkpoint(private_tensors: dict[str, torch.Tensor]) -> Checkpoint:
    return checkpoint_of("tiny-private", private_tensors)


@pytest.fixture
def base_checkpoint(base_tensors: dict[str, torch.Tensor]) -> Checkpoint:
    return checkpoint_of("tiny-base", base_tensors)


@pytest.fixture
def crossings() -> Iterator[list[Crossing]]:
    """Crossings a test opens, closed after it."""
    opened: list[Crossing] = []
    yield opened
    for crossing in opened:
        crossing.close()


def td_only(checkpoint: Checkpoint) -> Transformer:
    return load_model(checkpoint, torch.float32)[0]


@pytest.fixture
def split_on() -> Iterator[object]:
    """`split_on(checkpoint, reference, crossing, audit_rate)` -> a split model; closes devices."""
    opened: list[Crossing] = []

    def build(
        checkpoint: Checkpoint, reference: PublicReference, crossing: Crossing, rate: float = 1.0
    ) -> Transformer:
        opened.append(crossing)
        model = td_only(checkpoint)
        model.place(
            offload_public_prefix(
                model, checkpoint, reference, crossing, K, MAX_BATCH, MAX_SEQ, rate
            )
        )
        return model

    yield build
    for crossing in opened:
        crossing.close()
