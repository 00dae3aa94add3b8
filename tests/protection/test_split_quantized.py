"""`split` with ``quant``: the public prefix runs on the device in the model's dtype, as without
quant (its tensors are checked against the public reference as they are); the private tail and
the untied lm_head keep their weights int8/int4 in the TD. Its reference is the TD computing
everything itself with the same kernels per layer (`split_methods`), and it equals that bit for
bit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tdllm.model.int4_methods import Int4Avx512Method, Int4W4A8Method, Int4WeightOnlyMethod
from tdllm.model.int8_methods import Int8DynamicMethod, Int8GroupAvx2Method, Int8WeightOnlyMethod
from tdllm.model.linear import Linear, PlainCpuMethod
from tdllm.model.loader import load_model
from tdllm.model.quantized import quant_table
from tdllm.model.transformer import Batch, KVCache, Transformer
from tdllm.profiles import ProtectionOptions, ServedModel, build_model
from tdllm.profiles.split import split_methods
from tdllm.trusted.public_reference import PublicReference
from tests.cpu_kernels import INT4_QUANTS, W8A8_QUANTS
from tests.protection.conftest import CFG, MAX_BATCH, MAX_SEQ, K
from tests.protection.engine_runs import PROMPTS, greedy_tokens

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
QUANT_METHOD = {
    "int8": Int8WeightOnlyMethod,
    "int4": Int4WeightOnlyMethod,
    "w8a8": Int8DynamicMethod,
    "w8a8-onednn": Int8DynamicMethod,
    "w8a8-avx512": Int8DynamicMethod,
    "w8a8-avx2": Int8GroupAvx2Method,
    "w4a8": Int4W4A8Method,
    "w4a8-avx512": Int4Avx512Method,
}


def prompt_logits(model: Transformer) -> torch.Tensor:
    """Every position's logits for one fixed prompt, from a fresh cache."""
    cache = KVCache(CFG, MAX_BATCH, MAX_SEQ, torch.float32)
    with torch.inference_mode():
        return model(torch.tensor([PROMPT]), Batch([0], [0], len(PROMPT)), cache, last_only=False)


@pytest.fixture
def reference_file(reference: PublicReference, tmp_path: Path) -> Path:
    path = tmp_path / "tiny-base.json"
    reference.save(path)
    return path


@pytest.fixture
def served() -> Iterator[list[ServedModel]]:
    built: list[ServedModel] = []
    yield built
    for model in built:
        model.close()


@pytest.mark.parametrize("quant", ["int8", *INT4_QUANTS, *W8A8_QUANTS])
def test_split_with_quant_keeps_the_tail_quantized_and_equals_its_td_reference_bit_for_bit(
    quant: str, private_checkpoint, reference_file: Path, served: list[ServedModel]
) -> None:  # type: ignore[no-untyped-def]
    options = ProtectionOptions("split", "cpu", K, reference_file, audit_rate=1.0, quant=quant)
    split = build_model(private_checkpoint, torch.float32, options, MAX_BATCH, MAX_SEQ)
    served.append(split)
    model = split.model
    first_private = CFG.num_layers - K
    for layer in (m for m in model.modules() if isinstance(m, Linear)):
        private = layer.name == "lm_head" or int(layer.name.split(".")[2]) >= first_private
        if private:  # td-only's method for that name (int4's head is W8A8, w8a8's q|k|v int8)
            assert type(layer.method) is type(quant_table(quant).method_for(layer.name))
        else:  # the public prefix: plain, the very tensors checked against the reference
            assert type(layer.method) is PlainCpuMethod, layer.name
    assert isinstance(model.layers[first_private].mlp.down_proj.method, QUANT_METHOD[quant])
    td, _ = load_model(private_checkpoint, torch.float32, split_methods(CFG, K, quant))
    assert torch.equal(prompt_logits(td), prompt_logits(model))
    # one prompt at a time: the reference prefills prompts together (split cannot), and an int
    # method's prefill path depends on the rows in a call (docs/security.md, batch size)
    for prompt in PROMPTS:
        assert greedy_tokens(model, [prompt]) == greedy_tokens(td, [prompt])
    assert model.prefix is not None and model.prefix.audit.checked_rows > 0  # type: ignore[attr-defined]


def test_the_quantized_tail_changes_the_outputs_so_the_equality_above_can_fail(
    private_checkpoint,
) -> None:  # type: ignore[no-untyped-def]
    plain, _ = load_model(private_checkpoint, torch.float32, split_methods(CFG, K, "none"))
    int4, _ = load_model(private_checkpoint, torch.float32, split_methods(CFG, K, "int4"))
    assert not torch.equal(prompt_logits(plain), prompt_logits(int4))


def test_what_crosses_to_the_device_is_byte_for_byte_the_same_with_or_without_quant(
    private_checkpoint, reference_file: Path, served: list[ServedModel]
) -> None:  # type: ignore[no-untyped-def]
    transcripts = []
    for quant in ("none", "int4"):
        # audits and Freivalds checks off: a check drawn at random (1% of steps by default)
        # adds its own crossings to one run and not the other (a CI run failed on this)
        options = ProtectionOptions(
            "split",
            "cpu",
            K,
            reference_file,
            audit_rate=0.0,
            freivalds_rate=0.0,
            keep_payloads=True,
            quant=quant,
        )
        split = build_model(private_checkpoint, torch.float32, options, MAX_BATCH, MAX_SEQ)
        served.append(split)
        prompt_logits(split.model)
        assert split.crossing is not None
        transcripts.append(split.crossing.transcript.records)
    # the prefix weights uploaded and the prompt's prefix pass: only the TD's tail changed
    assert transcripts[0] == transcripts[1] and len(transcripts[0]) > 0
    assert all(r.payload is not None for r in transcripts[0])
