"""The real private fine-tune of the bundled SmolLM2 (`tdllm finetune-tail`, K = 2): split equals
td-only token for token on the cpu and process devices."""

from __future__ import annotations

import pytest
import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.profiles import ProtectionOptions, build_model
from tdllm.sources import open_checkpoint
from tests.integration.test_reference_equivalence import QUESTIONS

NEW_TOKENS = 16


@pytest.mark.slow
def test_split_greedy_tokens_equal_td_only_for_the_eight_reference_prompts(
    finetuned_k2_dir,
) -> None:  # type: ignore[no-untyped-def]
    checkpoint = open_checkpoint(finetuned_k2_dir)
    tok = checkpoint.tokenizer
    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS
    ]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    results = {}
    for profile, device in (("td-only", "cpu"), ("split", "cpu"), ("split", "process")):
        options = ProtectionOptions(profile, device, 2, audit_rate=1.0)
        served = build_model(checkpoint, torch.float32, options, 1, 128)
        model = served.model
        try:
            engine = Engine(model, tok, max_batch=1, max_seq_len=128)
            results[(profile, device)] = [
                engine.generate([p], params)[0].token_ids for p in prompts
            ]
        finally:
            served.close()
    assert results[("split", "cpu")] == results[("td-only", "cpu")]
    assert results[("split", "process")] == results[("td-only", "cpu")]
