"""Chunked prefill under every protection profile: a prompt prefilled in chunks (continuations
from a position > 0) generates the greedy tokens of whole-prompt prefill, on the device prefix
(`split`, its re-execution audit on), the masked linears and the obfuscated attention core."""

from __future__ import annotations

import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.transformer import Transformer
from tdllm.profiles import ProtectionOptions, build_model
from tdllm.profiles.masked import build_masked
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.public_reference import PublicReference
from tests.protection.conftest import MAX_BATCH, MAX_SEQ, checkpoint_of, td_only
from tests.protection.engine_runs import NoTokenizer

LONG = [(5 * i + 2) % 97 for i in range(27)]
PROMPTS = [LONG, [5, 17, 3, 42, 8], [9, 1, 60, 2], [70]]


def greedy(model: Transformer, chunk: int) -> list[list[int]]:
    engine = Engine(model, NoTokenizer(), MAX_BATCH, MAX_SEQ, prefill_chunk=chunk)  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    return [c.token_ids for c in engine.generate(PROMPTS, params)]


def test_td_only_chunked_tokens_equal_whole_prompt_tokens(private_checkpoint: Checkpoint) -> None:
    model = td_only(private_checkpoint)
    assert greedy(model, 4) == greedy(model, 0)


def test_split_chunked_tokens_equal_td_only_with_every_chunk_audited(
    private_checkpoint: Checkpoint, reference: PublicReference, split_on
) -> None:  # type: ignore[no-untyped-def]
    expected = greedy(td_only(private_checkpoint), 0)
    split = split_on(private_checkpoint, reference, Crossing.open("cpu"), 1.0)
    assert greedy(split, 4) == expected
    assert split.prefix.audit.checked_rows > 0  # continuation chunks passed the audit


def test_masked_chunked_tokens_equal_whole_prompt_tokens(
    private_checkpoint: Checkpoint, base_tensors: dict[str, torch.Tensor], crossings
) -> None:  # type: ignore[no-untyped-def]
    crossing = Crossing.open("cpu")
    crossings.append(crossing)
    base = checkpoint_of("tiny-base", base_tensors)
    masked, method = build_masked(private_checkpoint, base, torch.float32, crossing)
    whole = greedy(masked, 0)
    assert greedy(masked, 4) == whole
    assert method.stats.checked_calls == method.stats.calls > 0


def test_obfuscated_chunked_tokens_equal_whole_prompt_tokens(
    private_checkpoint: Checkpoint,
) -> None:
    options = ProtectionOptions("obfuscated", "cpu", obfuscation_seed=7)
    served = build_model(private_checkpoint, torch.float32, options, MAX_BATCH, MAX_SEQ)
    try:
        assert greedy(served.model, 4) == greedy(served.model, 0)
        assert greedy(served.model, 4) == greedy(td_only(private_checkpoint), 0)
    finally:
        served.close()
