"""The sealed load of a synthetic shape (`tdllm bench --shape ... --sealed-load`): its weights
(from the f16 file) sealed in bf16 with a throwaway data key, against the plain safetensors
export of the same bf16 weights; each loaded in a fresh process (`load_probe`, as a TD boots),
interleaved, best of `repeats`. Both go into a temporary folder that is deleted afterwards."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tdllm.model.checkpoint import save_hf_directory
from tdllm.sources import open_checkpoint
from tdllm_lab.bench.unseal import _probe
from tdllm_lab.sealing.writer import seal_checkpoint


def sealed_load(
    gguf: Path, progress: Callable[[str], None], repeats: int = 2, tmp_root: Path | None = None
) -> dict[str, Any]:
    key = bytearray(os.urandom(32))  # random weights: nothing secret
    with tempfile.TemporaryDirectory(prefix="tdllm-shape-sealed-", dir=tmp_root) as tmp:
        plain, sealed = Path(tmp) / "plain", Path(tmp) / "sealed"
        progress(f"bench: sealing {gguf.name} (bf16) and its plain export ...")
        save_hf_directory(open_checkpoint(gguf), plain, torch.bfloat16)
        seal_checkpoint(open_checkpoint(gguf), sealed, data_key=key, dtype=torch.bfloat16)
        nbytes = sum(p.stat().st_size for p in sealed.iterdir())
        runs: dict[str, list[dict[str, float]]] = {"plain": [], "sealed": []}
        for i in range(repeats):
            progress(f"bench: load plain / sealed in fresh processes ({i + 1}/{repeats}) ...")
            runs["plain"].append(_probe("plain", plain, key))
            runs["sealed"].append(_probe("sealed", sealed, key))
    plain_s, sealed_s = (min(r["wall_s"] for r in runs[k]) for k in ("plain", "sealed"))
    return {
        "sealed_bytes": nbytes,
        "plain_s": round(plain_s, 3),
        "sealed_s": round(sealed_s, 3),
        "ratio": round(sealed_s / plain_s, 3),
        "repeats": repeats,
    }
