"""`tdllm bench context`: the KV cache's memory follows what the slots hold, and one sequence is
measured at each depth asked for."""

from __future__ import annotations

import pytest
import torch

from tdllm.sources import open_checkpoint
from tdllm_lab.bench.context import format_report, run_context


@pytest.mark.slow  # the bundled model, 5 sequences: ~7 s (CI's make test is near its budget)
def test_the_context_bench_sees_pages_come_and_go_with_the_sequences() -> None:
    report = run_context(open_checkpoint("bundled"), torch.bfloat16, 4, [40], 3)
    slots = report["slots"]
    assert report["context"] == 8192 and slots["address_space_mib"] >= 4 * 8192 * 22.5 / 1024
    assert slots["idle"]["kv_resident_mib"] == 0 == slots["after"]["kv_resident_mib"]
    # 4 sequences of 128 + 3 positions: what they held, rounded up to pages, nothing more
    held = slots["peak"]["kv_held_mib"]
    assert 0 < held <= slots["peak"]["kv_resident_mib"] <= 1.3 * held
    (depth,) = report["depth"]
    assert depth["prompt_tokens"] == 40 and depth["decode_tok_s"] > 0
    assert "KV address space" in format_report(report)
    with pytest.raises(ValueError, match="exceed"):
        run_context(open_checkpoint("bundled"), torch.bfloat16, 1, [8190], 3)
