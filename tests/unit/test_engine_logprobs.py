"""Logprobs from the engine: each token's log-probability under the raw model and the top
alternatives, only for the sequences that ask, equal to a full forward pass's own."""

from __future__ import annotations

import pytest
import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.engine.sampling import MAX_LOGPROBS, LogprobTable
from tdllm.model.transformer import Batch, KVCache
from tests.protection.engine_runs import NoTokenizer
from tests.tiny_model import TINY, tiny_model

PROMPTS = [[5, 17, 3, 42, 8], [9, 1, 60, 2], [33, 34, 35]]


def _engine() -> Engine:
    return Engine(tiny_model(), NoTokenizer(), max_batch=8, max_seq_len=48)  # type: ignore[arg-type]


def _reference_logprobs(sequence: list[int]) -> torch.Tensor:
    """log_softmax of the logits at every position of `sequence`, in one uncached pass."""
    model = tiny_model()
    cache = KVCache(model.cfg, 1, 48, model.dtype)
    with torch.inference_mode():
        logits = model(torch.tensor([sequence]), Batch([0], [0], len(sequence)), cache, False)
    return torch.log_softmax(logits[0].float(), dim=-1)


def test_each_token_gets_the_raw_models_logprob_and_top_alternatives() -> None:
    params = SamplingParams(max_tokens=6, temperature=0.7, seed=3, ignore_eos=True, logprobs=4)
    for prompt, done in zip(PROMPTS, _engine().generate(PROMPTS, params), strict=True):
        assert done.logprobs is not None and len(done.logprobs) == len(done.token_ids) == 6
        reference = _reference_logprobs(prompt + done.token_ids)
        for t, entry in enumerate(done.logprobs):
            row = reference[len(prompt) - 1 + t]  # the position that predicted token t
            assert entry.token_id == done.token_ids[t]
            assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
            values, ids = torch.topk(row, 4)
            assert [i for i, _ in entry.top] == ids.tolist()
            assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)


def test_logprobs_are_the_models_not_the_processed_ones() -> None:
    """vLLM's default (raw logprobs): a bias that forces a token does not make it certain."""
    forced = 11
    params = SamplingParams(
        max_tokens=3, temperature=0.0, ignore_eos=True, logit_bias=((forced, 100.0),), logprobs=1
    )
    (done,) = _engine().generate(PROMPTS[:1], params)
    assert done.token_ids == [forced] * 3
    assert done.logprobs is not None
    assert all(entry.logprob < -0.01 for entry in done.logprobs)  # not log(1) = 0


def test_only_sequences_that_ask_get_logprobs_and_asking_changes_no_token() -> None:
    plain = SamplingParams(max_tokens=5, temperature=1.0, seed=7, ignore_eos=True)
    asking = SamplingParams(max_tokens=5, temperature=1.0, seed=7, ignore_eos=True, logprobs=0)
    mixed = _engine().generate(PROMPTS[:2], [plain, asking])
    assert mixed[0].logprobs is None
    assert mixed[1].logprobs is not None and all(e.top == () for e in mixed[1].logprobs)
    alone = _engine().generate(PROMPTS[:2], plain)
    assert [c.token_ids for c in mixed] == [c.token_ids for c in alone]


def test_choices_sharing_one_prefill_each_get_their_own_tokens_logprobs() -> None:
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=1, ignore_eos=True, n=3, logprobs=2)
    choices = _engine().generate(PROMPTS[:1], params)
    for choice in choices:
        assert choice.logprobs is not None
        assert [e.token_id for e in choice.logprobs] == choice.token_ids
    first = [c.logprobs[0] for c in choices if c.logprobs]
    assert len({e.top for e in first}) == 1  # one prompt, one distribution


def test_a_table_computes_the_rows_that_asked_together() -> None:
    logits = torch.randn(3, TINY.vocab_size, generator=torch.Generator().manual_seed(0))
    table = LogprobTable(logits, [0, 5, 2])
    assert table.top_ids.shape == (3, 5)
    entry = table.of(2, 7)
    assert entry.token_id == 7 and len(entry.top) == 2
    assert torch.exp(table.logprobs).sum(-1) == pytest.approx([1.0] * 3)


def test_more_than_the_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=MAX_LOGPROBS + 1)
