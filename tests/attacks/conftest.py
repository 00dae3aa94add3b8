"""The tiny public base and its private derivative (tests/protection's), for fast attack runs."""

from __future__ import annotations

import pytest

from tdllm.model.checkpoint import Checkpoint
from tdllm_lab.protection.private_model import privatize
from tests.protection.conftest import CFG, K, checkpoint_of
from tests.tiny_model import tiny_tensors


@pytest.fixture(scope="session")
def tiny_pair() -> tuple[Checkpoint, Checkpoint]:
    """(private, base) checkpoints: base random, private = base with its last K blocks and
    an untied lm_head perturbed."""
    base = tiny_tensors(CFG, seed=3)
    private = privatize(base.items(), CFG, K, seed=1)
    return checkpoint_of("tiny-private", private), checkpoint_of("tiny-base", base)
