"""The compiled decode step under the profiles: split's private tail compiles (the device
prefix and its audit stay outside the graph) and generates td-only's greedy tokens; a profile
whose blocks cross the TD (masked) is refused with one clear error, before anything compiles."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch._dynamo.utils import counters

from tdllm.engine import Engine, SamplingParams
from tdllm.errors import ModelLoadError
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.transformer import Transformer
from tdllm.profiles.masked import build_masked
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.public_reference import PublicReference
from tests.protection.conftest import MAX_BATCH, MAX_SEQ, checkpoint_of, td_only
from tests.protection.engine_runs import PROMPTS, NoTokenizer


def greedy(model: Transformer, compile: str) -> list[list[int]]:
    engine = Engine(model, NoTokenizer(), MAX_BATCH, MAX_SEQ, compile=compile)  # type: ignore[arg-type]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (4, 9, 9, 2)]
    return [c.token_ids for c in engine.generate(PROMPTS, params)]


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.slow  # a second compile (~12 s); make test compiles once, in tests/unit
@pytest.mark.parametrize("mode", ["decode", "decode-groups"])
def test_split_compiled_tail_generates_td_only_tokens(
    private_checkpoint: Checkpoint,
    reference: PublicReference,
    split_on,  # type: ignore[no-untyped-def]
    fresh_dynamo: None,
    mode: str,
) -> None:
    expected = greedy(td_only(private_checkpoint), "off")
    split = split_on(private_checkpoint, reference, Crossing.open("cpu"), 1.0)
    assert greedy(split, mode) == expected
    assert split.decode_step is not None
    assert counters["stats"]["unique_graphs"] == 2  # one row, more rows; no crossing in them
    assert split.prefix.audit.checked_rows > 0  # decode rows still crossed and were audited


def test_masked_model_is_refused_before_compiling(
    private_checkpoint: Checkpoint, base_tensors: dict[str, torch.Tensor]
) -> None:
    crossing = Crossing.open("cpu")
    try:
        base = checkpoint_of("tiny-base", base_tensors)
        masked, _ = build_masked(private_checkpoint, base, torch.float32, crossing)
        with pytest.raises(ModelLoadError, match="compile 'decode' needs every block in the TD"):
            Engine(masked, NoTokenizer(), MAX_BATCH, MAX_SEQ, compile="decode")  # type: ignore[arg-type]
        assert masked.decode_step is None
    finally:
        crossing.close()
