"""`tdllm bench unseal`: what sealing costs, in throughput and in model load time.

Seal and unseal throughput are measured on the bundled model (fp32, its tensors held in memory so
GGUF dequantization is not counted) and on a 1 GiB synthetic tensor set; load time compares
`load_model` on the sealed bundled model with the plain safetensors export of the same weights.
Everything is written to a temporary directory that is deleted afterwards (the synthetic data is
not secret, and the bundled model is public). Sealing runs on one thread; unsealing is measured on
one thread (GB/s per core) and with the reader's default thread count (wall-clock GB/s, and what
`load_model` uses). Best of `repeats` runs (timeit's rule: noise only ever adds time); the page
cache is warm for both formats. Load time is measured the way a TD boots, one load per fresh
process (`load_probe.py`), and also repeated inside one process for comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tdllm.model.checkpoint import Checkpoint, open_hf_directory, save_hf_directory
from tdllm.model.loader import load_model
from tdllm.sealing.reader import DEFAULT_THREADS, open_sealed
from tdllm.sources import open_checkpoint
from tdllm_lab.bench.machine import machine
from tdllm_lab.sealing.writer import seal_checkpoint

SYNTHETIC_BYTES = 1 << 30
SYNTHETIC_TENSOR_BYTES = 16 << 20
REPEATS = 5


def run_unseal_bench(
    progress: Callable[[str], None] = lambda _: None, repeats: int = REPEATS
) -> dict[str, Any]:
    """Run every measurement and return a JSON-ready report (best of `repeats` runs)."""
    key = bytearray(os.urandom(32))  # a throwaway data key for public and synthetic data
    with tempfile.TemporaryDirectory(prefix="tdllm-bench-unseal-") as tmp:
        root = Path(tmp)
        progress("bundled model: dequantizing ...")
        bundled = _in_memory(open_checkpoint("bundled"))
        report: dict[str, Any] = {"machine": machine(), "repeats": repeats}
        progress("bundled model: seal / unseal ...")
        report["bundled"] = _throughput(bundled, root / "bundled", key, repeats)
        progress("bundled model: load time, sealed vs plain ...")
        report["load"] = _load_times(bundled, root, key, repeats)
        del bundled
        progress("1 GiB synthetic: seal / unseal ...")
        report["synthetic_1gib"] = _throughput(_synthetic(), root / "synthetic", key, repeats)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a short table for people."""
    lines = [f"machine: {report['machine']['cpu']} ({report['machine']['cores']} cores)"]
    for label, key in (("bundled (fp32)", "bundled"), ("1 GiB synthetic", "synthetic_1gib")):
        row = report[key]
        lines.append(
            f"{label:<16} {row['gigabytes']:.3f} GB  seal {row['seal_gb_s']:.2f} GB/s  "
            f"unseal {row['unseal_1_thread_gb_s']:.2f} GB/s on 1 thread, "
            f"{row['unseal_gb_s']:.2f} GB/s on {row['unseal_threads']}"
        )
    load = report["load"]
    lines.append(
        f"load bundled     plain {load['plain_s']:.3f} s  sealed {load['sealed_s']:.3f} s  "
        f"ratio {load['ratio']:.2f}x (target <= 1.2x; fresh process each, as a TD boots); "
        f"CPU time ratio {load['cpu_ratio']:.2f}x"
    )
    lines.append(
        f"  repeated in one process: plain {load['in_process_plain_s']:.3f} s  sealed "
        f"{load['in_process_sealed_s']:.3f} s  ratio {load['in_process_ratio']:.2f}x"
    )
    return "\n".join(lines)


def _in_memory(checkpoint: Checkpoint) -> Checkpoint:
    tensors = list(checkpoint.tensors())
    return Checkpoint(
        checkpoint.name,
        checkpoint.path,
        checkpoint.config,
        checkpoint.tokenizer,
        lambda: iter(tensors),
    )


def _synthetic() -> Checkpoint:
    base = open_checkpoint("bundled")  # config and tokenizer only; the tensors are not read
    generator = torch.Generator().manual_seed(0)
    count = SYNTHETIC_BYTES // SYNTHETIC_TENSOR_BYTES
    tensors = [
        (f"synthetic.{i}", torch.rand(SYNTHETIC_TENSOR_BYTES // 4, generator=generator))
        for i in range(count)
    ]
    return Checkpoint("synthetic", base.path, base.config, base.tokenizer, lambda: iter(tensors))


def _throughput(
    checkpoint: Checkpoint, folder: Path, key: bytearray, repeats: int
) -> dict[str, float]:
    nbytes = sum(t.numel() * t.element_size() for _, t in checkpoint.tensors())
    seal_s: list[float] = []
    unseal_s: dict[int, list[float]] = {1: [], DEFAULT_THREADS: []}
    for _ in range(repeats):
        start = time.perf_counter()
        seal_checkpoint(checkpoint, folder, data_key=key)
        seal_s.append(time.perf_counter() - start)
        for threads, times in unseal_s.items():
            start = time.perf_counter()
            for _name, _tensor in open_sealed(folder, data_key=key, threads=threads).tensors():
                pass
            times.append(time.perf_counter() - start)
        _remove(folder)
    gigabytes = nbytes / 1e9
    return {
        "gigabytes": gigabytes,
        "seal_s": min(seal_s),
        "seal_gb_s": gigabytes / min(seal_s),
        "unseal_1_thread_gb_s": gigabytes / min(unseal_s[1]),
        "unseal_threads": DEFAULT_THREADS,
        "unseal_gb_s": gigabytes / min(unseal_s[DEFAULT_THREADS]),
    }


def _load_times(checkpoint: Checkpoint, root: Path, key: bytearray, repeats: int) -> dict[str, Any]:
    """Fresh-process loads (as a TD boots), interleaved plain/sealed; plus in-process repeats."""
    plain_dir, sealed_dir = root / "plain", root / "sealed"
    save_hf_directory(checkpoint, plain_dir)
    seal_checkpoint(checkpoint, sealed_dir, data_key=key)
    fresh: dict[str, list[dict[str, float]]] = {"plain": [], "sealed": []}
    for _ in range(repeats):
        fresh["plain"].append(_probe("plain", plain_dir, key))
        fresh["sealed"].append(_probe("sealed", sealed_dir, key))
    plain, sealed = (min(r["wall_s"] for r in fresh[k]) for k in ("plain", "sealed"))
    plain_cpu, sealed_cpu = (min(r["cpu_s"] for r in fresh[k]) for k in ("plain", "sealed"))
    warm_plain, warm_sealed = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        load_model(open_hf_directory(plain_dir), torch.float32)
        warm_plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        load_model(open_sealed(sealed_dir, data_key=key), torch.float32)
        warm_sealed.append(time.perf_counter() - start)
    return {
        "plain_s": plain,
        "sealed_s": sealed,
        "ratio": sealed / plain,
        "plain_cpu_s": plain_cpu,
        "sealed_cpu_s": sealed_cpu,
        "cpu_ratio": sealed_cpu / plain_cpu,
        "minor_faults": {k: min(r["minor_faults"] for r in fresh[k]) for k in fresh},
        "in_process_plain_s": min(warm_plain),
        "in_process_sealed_s": min(warm_sealed),
        "in_process_ratio": min(warm_sealed) / min(warm_plain),
    }


def _probe(kind: str, folder: Path, key: bytearray, quant: str = "none") -> dict[str, float]:
    command = [sys.executable, "-m", "tdllm_lab.bench.load_probe", kind, str(folder), quant]
    done = subprocess.run(  # noqa: S603 - our own interpreter and module
        command, input=key.hex() + "\n", capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _remove(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
