"""No byte pattern of a sealed tensor, and never the data key, appears anywhere on disk."""

from __future__ import annotations

import os
import random

import torch

from .sealed_dirs import all_files
from .synthetic import Sealer, synthetic_checkpoint

WINDOW = 32


def windows(raw: bytes, rng: random.Random, count: int = 8) -> list[bytes]:
    """Distinctive 32-byte windows: start, end and random offsets, skipping low-entropy ones."""
    starts = [0, len(raw) - WINDOW] + [rng.randrange(len(raw) - WINDOW) for _ in range(count)]
    picked = [raw[s : s + WINDOW] for s in starts]
    return [w for w in picked if len(set(w)) > 8]


def test_no_window_of_any_sealed_tensor_appears_in_any_file(seal_tiny: Sealer) -> None:
    rng = random.Random(5)  # noqa: S311 - reproducible offsets, not a secret
    key = os.urandom(32)
    for dtype in (torch.float32, torch.bfloat16):
        source = synthetic_checkpoint(seed=21, dtype=dtype)
        folder = seal_tiny(source, data_key=key, public_patterns=["*norm*"])
        disk = [p.read_bytes() for p in all_files(folder)]
        searched = 0
        for name, tensor in source.tensors():
            raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
            found = any(w in blob for w in windows(raw, rng) for blob in disk)
            if "norm" in name:
                assert found, f"public tensor {name} should be stored in the clear"
                continue
            assert not found, f"plaintext of sealed tensor {name} is on disk"
            searched += 1
        assert searched >= 10
        assert not any(key in blob for blob in disk), "the data key is on disk"
