"""`tdllm protect --report`: the deviation, FLOP-share, byte-search and A1 pieces, and the
command end to end on the real fine-tune (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tdllm.cli import cli
from tdllm.model.loader import load_model
from tdllm.trusted.public_reference import PublicReference
from tdllm_lab.protection.report import (
    BEGIN_MARK,
    END_MARK,
    a1_run,
    find_windows,
    output_deviation,
    td_flops_share,
    tensor_bytes,
    write_into_doc,
)
from tests.protection.conftest import CFG, K, checkpoint_of
from tests.protection.engine_runs import NoTokenizer

SEQUENCES = [[5, 17, 3, 42, 8], [9, 1, 60, 2, 33, 34]]


def test_the_window_search_finds_a_window_at_any_byte_offset_and_nothing_in_noise() -> None:
    secret = tensor_bytes(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    windows = [secret[0:16], secret[100:116], secret[200:216]]
    noise = tensor_bytes(torch.randn(4096, generator=torch.Generator().manual_seed(2)))
    assert find_windows([noise], windows) == set()
    for offset in range(4):
        planted = noise[: 1000 + offset] + secret[100:116] + noise[1000:]
        assert find_windows([noise, planted], windows) == {secret[100:116]}


def test_the_deviation_is_zero_for_the_base_and_positive_for_a_private_tail(
    base_tensors, private_tensors
) -> None:  # type: ignore[no-untyped-def]
    base, _ = load_model(checkpoint_of("tiny-base", base_tensors))
    private, _ = load_model(checkpoint_of("tiny-private", private_tensors))
    assert output_deviation(base, base, SEQUENCES) == 0.0
    assert 0.0 < output_deviation(private, base, SEQUENCES) < 10.0


def test_the_td_share_of_flops_grows_with_k_and_prefill_shares_less(private_tensors) -> None:  # type: ignore[no-untyped-def]
    model, _ = load_model(checkpoint_of("tiny-private", private_tensors))
    shares = [td_flops_share(model, k, context=16) for k in (1, 2, 3)]
    decode = [d for d, _ in shares]
    assert all(0.0 < d < 1.0 for d in decode)
    assert decode == sorted(decode) and len(set(decode)) == 3
    assert all(prefill < d for d, prefill in shares)  # prefill runs the head only once


def test_a1_run_does_not_search_a_tail_tensor_equal_to_a_public_one(
    private_tensors, base_tensors, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """A head kept as BASE's embedding (the distill recipe) is on the device as the embedding:
    no secret, not a find; the tail's trained tensors are still searched."""
    reference = tmp_path / "public-prefix.json"
    PublicReference.build("tiny-base", base_tensors.items()).save(reference)
    tensors = dict(private_tensors)
    tensors["lm_head.weight"] = base_tensors["model.embed_tokens.weight"].clone()
    checkpoint = checkpoint_of("tiny-private", tensors)
    result = a1_run(checkpoint, K, "cpu", [5, 17, 3, 42], 3, reference, NoTokenizer())
    assert result.tail_tensors_public == 1
    assert result.private_tensors == 9 * K + 1
    assert result.private_windows_found == 0 and result.non_public_bytes_on_device == 0


@pytest.mark.parametrize("device", ["cpu", "process"])
def test_a1_run_finds_no_private_byte_on_the_device(
    device, private_tensors, base_tensors, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    reference = tmp_path / "public-prefix.json"
    PublicReference.build("tiny-base", base_tensors.items()).save(reference)
    checkpoint = checkpoint_of("tiny-private", private_tensors)
    result = a1_run(checkpoint, K, device, [5, 17, 3, 42], 6, reference, NoTokenizer())
    assert result.generated_tokens == 6
    assert result.private_tensors == 9 * K + 2
    assert result.private_windows_searched > 100
    assert result.transcript_bytes > 100_000 and result.device_resident_bytes > 50_000
    assert result.private_windows_found == 0
    assert result.device_weights > 0 and result.device_weights_not_public == 0
    assert result.non_public_bytes_on_device == 0
    assert result.hidden_bytes_per_token == CFG.hidden_size * 4


def test_the_report_is_written_between_the_markers_only(tmp_path: Path) -> None:
    doc = tmp_path / "security.md"
    doc.write_text(f"intro\n{BEGIN_MARK}\nold table\n{END_MARK}\noutro\n")
    row = {
        "k": 2,
        "held_out_loss": 0.1,
        "held_out_recalled": "9/10",
        "deviation_private_prompts": 0.3,
        "deviation_unrelated_prompts": 0.2,
        "td_flops_share_decode": 0.26,
        "td_flops_share_prefill": 0.07,
        "td_weight_bytes_share_decode": 0.26,
        "a1": {
            "hidden_bytes_per_token": 2304.0,
            "non_public_bytes_on_device": 0,
            "private_windows_found": 0,
            "private_windows_searched": 160,
            "generated_tokens": 16,
            "transcript_bytes": 1,
            "device_resident_bytes": 1,
            "private_tensors": 20,
            "device_weights_not_public": 0,
            "device_weights": 253,
            "crossing_bytes_per_token": 1.0,
        },
    }
    report = {
        "base": "b",
        "held_out_loss_base": 2.67,
        "private_model": "m",
        "context_tokens": 64,
        "device": "process",
        "threads": 2,
        "seconds": 1.0,
        "rows": [row],
    }
    write_into_doc(doc, report, "tdllm protect --report")
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n")
    assert "old table" not in text and "| 2 | 0.100 | 9/10 |" in text
    write_into_doc(doc, report, "tdllm protect --report")  # idempotent: markers kept
    assert doc.read_text() == text


def test_protect_refuses_a_doc_without_markers_before_measuring(tmp_path: Path) -> None:
    doc = tmp_path / "plain.md"
    doc.write_text("no markers here\n")
    result = CliRunner().invoke(cli, ["protect", "--report", "--write-docs", str(doc)])
    assert result.exit_code != 0
    assert "markers" in str(result.exception)
    assert doc.read_text() == "no markers here\n"


def test_protect_without_report_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["protect"])
    assert result.exit_code == 2 and "--report" in result.output


@pytest.mark.slow
@pytest.mark.timeout(1800)  # audits and Freivalds at rate 1 on the real model: minutes on 2 cores
def test_protect_report_on_the_real_fine_tune_measures_a1_zero(finetuned_k2_dir: Path) -> None:
    cache = finetuned_k2_dir.parent
    args = ["protect", "--report", "--k", "2", "--device", "cpu", "--json"]
    result = CliRunner().invoke(cli, [*args, "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)["rows"]
    assert row["a1"]["non_public_bytes_on_device"] == 0
    assert row["a1"]["private_windows_found"] == 0
    assert row["a1"]["device_weights_not_public"] == 0
    assert row["deviation_private_prompts"] > 0.05
    assert 0.2 < row["td_flops_share_decode"] < 0.35  # K=2 + the 49152 x 576 head of 30 blocks
