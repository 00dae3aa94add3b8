"""`tdllm bench structured`: free and constrained decoding measured side by side."""

from __future__ import annotations

import pytest
import torch

from tdllm.sources import open_checkpoint
from tdllm_lab.bench.structured import format_report, run_structured


@pytest.mark.slow  # a bench's own check (~10-25 s): `make test-slow`, not CI's budget
def test_the_structured_bench_counts_only_full_batch_steps_of_both_modes() -> None:
    report = run_structured(open_checkpoint("bundled"), torch.float32, [1, 2], 12, repeats=1)
    assert [row["batch"] for row in report["rows"]] == [1, 2]
    for row in report["rows"]:
        free, constrained = row["runs"]["free"][0], row["runs"]["json_schema"][0]
        # free: every step after the first token runs the whole batch until max_tokens
        assert free["tokens"] == row["batch"] * (12 - 2)
        # constrained: greedy copies of one prompt stay together; the JSON is not done in 12
        assert constrained["tokens"] == free["tokens"]
        assert abs(row["ratio"] - row["json_schema_tok_s"] / row["free_tok_s"]) < 0.01
    assert "json_schema tok/s" in format_report(report)
