"""The sealed load of a synthetic shape (`tdllm bench --shape ... --sealed-load`): its weights
(from the f16 file) sealed in bf16 with a throwaway data key, against the plain safetensors
export of the same bf16 weights; each loaded in a fresh process (`load_probe`, as a TD boots),
interleaved, best of `repeats`. With a quantized format (q4_0, q8_0), also that file sealed two
ways, as bf16 floats (dequantized: what sealing did before `--keep-quantized`) and as its GGUF
blocks (`keep_quantized`), both loaded with the format's quant (int4, int8): sizes and load
times. All of it goes into a temporary folder that is deleted afterwards."""

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
    gguf: Path,
    progress: Callable[[str], None],
    repeats: int = 2,
    tmp_root: Path | None = None,
    quantized: tuple[Path, str] | None = None,
) -> dict[str, Any]:
    """`quantized`: (a quantized format's GGUF, the quant it loads with) to seal both ways."""
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
        blocks = (
            None
            if quantized is None
            else _blocks_vs_floats(*quantized, key, Path(tmp), progress, repeats)
        )
    plain_s, sealed_s = (min(r["wall_s"] for r in runs[k]) for k in ("plain", "sealed"))
    report: dict[str, Any] = {
        "sealed_bytes": nbytes,
        "plain_s": round(plain_s, 3),
        "sealed_s": round(sealed_s, 3),
        "ratio": round(sealed_s / plain_s, 3),
        "repeats": repeats,
    }
    if blocks is not None:
        report["quantized"] = blocks
    return report


def _blocks_vs_floats(
    gguf: Path,
    quant: str,
    key: bytearray,
    tmp: Path,
    progress: Callable[[str], None],
    repeats: int,
) -> dict[str, Any]:
    """The quantized GGUF sealed as bf16 floats and as its blocks, each loaded with `quant`."""
    floats, blocks = tmp / "quantized-as-bf16", tmp / "quantized-as-blocks"
    progress(f"bench: sealing {gguf.name} as bf16 floats and as its GGUF blocks ...")
    seal_checkpoint(open_checkpoint(gguf), floats, data_key=key, dtype=torch.bfloat16)
    seal_checkpoint(open_checkpoint(gguf), blocks, data_key=key, keep_quantized=True)
    runs: dict[str, list[dict[str, float]]] = {"floats": [], "blocks": []}
    for i in range(repeats):
        progress(f"bench: load both seals with {quant} in fresh processes ({i + 1}/{repeats}) ...")
        runs["floats"].append(_probe("sealed", floats, key, quant))
        runs["blocks"].append(_probe("sealed", blocks, key, quant))
    floats_s, blocks_s = (min(r["wall_s"] for r in runs[k]) for k in ("floats", "blocks"))
    # CPU time too: on a shared machine, wall time is mostly the neighbours' load
    floats_cpu, blocks_cpu = (min(r["cpu_s"] for r in runs[k]) for k in ("floats", "blocks"))
    floats_bytes, blocks_bytes = (
        sum(p.stat().st_size for p in d.iterdir()) for d in (floats, blocks)
    )
    return {
        "file": gguf.name,
        "quant": quant,
        "floats_bytes": floats_bytes,
        "blocks_bytes": blocks_bytes,
        "size_ratio": round(blocks_bytes / floats_bytes, 3),
        "floats_s": round(floats_s, 3),
        "blocks_s": round(blocks_s, 3),
        "load_ratio": round(blocks_s / floats_s, 3),
        "floats_cpu_s": round(floats_cpu, 3),
        "blocks_cpu_s": round(blocks_cpu, 3),
    }
