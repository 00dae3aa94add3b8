"""`masked` with ``quant``: the weights the TD multiplies itself (each private projection's dense
delta, and the lm_head) take td-only's methods for that quant (`quant_table`, by name); what the
device holds and computes is the scheme's public int8 product, as without. The reference is the
TD path with the same quant (no crossing), and the masked path equals it bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tdllm.model.checkpoint import Checkpoint
from tdllm.model.int8_methods import Int8WeightOnlyMethod
from tdllm.model.quantized import quant_table
from tdllm.model.transformer import Batch, KVCache, Transformer
from tdllm.profiles import ProtectionOptions, build_model
from tdllm.profiles.masked import build_masked, masked_linears
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.masked_linear import kept_by
from tdllm.trusted.public_reference import PublicReference
from tests.cpu_kernels import INT4_QUANTS, W8A8_QUANTS
from tests.protection.engine_runs import greedy_tokens, masked_method

PROMPT = [5, 17, 3, 42, 8, 9, 60, 2]


def prompt_logits(model: Transformer) -> torch.Tensor:
    cache = KVCache(model.cfg, 1, 16, torch.float32)
    with torch.inference_mode():
        return model(torch.tensor([PROMPT]), Batch([0], [0], len(PROMPT)), cache, last_only=False)


@pytest.mark.parametrize("quant", ["int8", *INT4_QUANTS, *W8A8_QUANTS])
def test_masked_with_quant_keeps_delta_and_head_quantized_and_equals_its_td_reference(
    quant: str,
    private_checkpoint: Checkpoint,
    base_checkpoint: Checkpoint,
    crossings: list[Crossing],
) -> None:
    reference, _ = build_masked(
        private_checkpoint, base_checkpoint, torch.float32, None, quant=quant
    )
    crossing = Crossing.open("cpu")
    crossings.append(crossing)
    masked, method = build_masked(
        private_checkpoint, base_checkpoint, torch.float32, crossing, quant=quant
    )
    table = quant_table(quant)
    kept = {name: s.delta_layer for name, s in method.states.items() if s.delta_layer is not None}
    assert len(kept) == 2 * 4  # the K = 2 private blocks' projections; the rest have no delta
    assert all(s.delta is None for s in method.states.values())  # no fp32 copy left
    for name, layer in kept.items():  # w8a8 keeps q|k|v weight-only, as td-only does
        assert type(layer.method) is type(table.method_for(name)), name
    assert type(masked.lm_head.method) is type(table.method_for("lm_head"))
    assert greedy_tokens(masked, n=6) == greedy_tokens(reference, n=6)
    assert method.stats.calls > 0 and method.stats.checked_calls == method.stats.calls


def test_the_quantized_delta_is_applied_and_changes_the_outputs_so_the_equality_can_fail(
    private_checkpoint: Checkpoint, base_checkpoint: Checkpoint
) -> None:
    plain, _ = build_masked(private_checkpoint, base_checkpoint, torch.float32, None)
    int4, method = build_masked(
        private_checkpoint, base_checkpoint, torch.float32, None, quant="int4"
    )
    before, after = prompt_logits(plain), prompt_logits(int4)
    assert not torch.equal(before, after)
    assert float((before - after).norm() / before.norm()) < 0.1  # changed, not broken
    # the delta layers, not only the head, are in the product: without them the logits move
    for state in method.states.values():
        state.delta_layer = None
    assert not torch.equal(prompt_logits(int4), after)


def test_the_fp32_delta_is_zeroed_once_a_quant_keeps_it(
    private_checkpoint: Checkpoint, base_checkpoint: Checkpoint
) -> None:
    int8, method = build_masked(
        private_checkpoint, base_checkpoint, torch.float32, None, quant="int8"
    )
    layer = next(m for m in masked_linears(int8) if method.states[m.name].delta_layer is not None)
    delta = torch.randn(layer.out_features, layer.in_features)
    kept = kept_by(layer, delta, Int8WeightOnlyMethod(), torch.float32)
    assert not bool(delta.any())
    assert kept(torch.ones(1, layer.in_features)).abs().sum() > 0  # what it kept is not zero


def test_what_the_device_sees_is_the_same_with_or_without_quant(
    private_checkpoint: Checkpoint, base_checkpoint: Checkpoint
) -> None:
    """The device holds BASE's public int8 weights whatever the quant: nothing quantized from
    MODEL crosses (the padded activations are fresh randomness in each run: not compared)."""
    held = []
    for quant in ("none", "int4"):
        crossing = Crossing.open("cpu", keep_payloads=True)
        try:
            model, _ = build_masked(
                private_checkpoint, base_checkpoint, torch.float32, crossing, quant=quant
            )
            prompt_logits(model)
            held.append(crossing.dump())
            sent = [r for r in crossing.transcript.records if r.direction == "to_device"]
            assert {r.name for r in sent} >= {"x"}  # the padded rows did cross
        finally:
            crossing.close()
    assert held[0].keys() == held[1].keys() and len(held[0]) > 0
    assert all(torch.equal(held[0][name], held[1][name]) for name in held[0])


def test_the_masked_profile_takes_quant_from_its_options(
    private_checkpoint: Checkpoint,
    base_checkpoint: Checkpoint,
    reference: PublicReference,
    tmp_path: Path,
) -> None:
    reference.save(pinned := tmp_path / "reference.json")
    options = ProtectionOptions(
        "masked", "cpu", public_reference=pinned, masked_base=base_checkpoint, quant="int8"
    )
    served = build_model(private_checkpoint, torch.float32, options, 4, 48)
    try:
        method = masked_method(served.model)
        assert sum(s.delta_layer is not None for s in method.states.values()) == 2 * 4
        td, _ = build_masked(private_checkpoint, base_checkpoint, torch.float32, None, quant="int8")
        assert greedy_tokens(served.model, n=6) == greedy_tokens(td, n=6)
    finally:
        served.close()


def test_bench_fidelity_refuses_masked_quant_beside_quant_in_one_line() -> None:
    from click.testing import CliRunner

    from tdllm.cli import cli

    args = ["bench", "fidelity", "--quant", "int8", "--masked-quant", "int4"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "--masked-quant adds rows" in result.output
    assert "Traceback" not in result.output
