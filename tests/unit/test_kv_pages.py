"""The KV cache offers every slot the whole context but holds memory only for what is written,
hands a finished sequence's pages back, keeps prompts' keys out of core dumps, and the engine's
KV budget bounds it: what an attacker with many long requests could otherwise take (the TD's
memory) and what a slot's next user could otherwise find (the last user's keys)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.errors import UsageError
from tdllm.model.config import ModelConfig
from tdllm.model.transformer import KVCache
from tdllm.settings import Settings, SettingsError
from tdllm.zero_pages import PAGE, ZeroPages
from tests.protection.engine_runs import NoTokenizer
from tests.tiny_model import TINY, tiny_model

LONG = dataclasses.replace(TINY, max_position_embeddings=8192)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def engine(cfg: ModelConfig = TINY, max_batch: int = 4, kv_tokens: int = 0) -> Engine:
    model = tiny_model(cfg)
    return Engine(model, NoTokenizer(), max_batch, kv_tokens=kv_tokens)  # type: ignore[arg-type]


def prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, TINY.vocab_size, (n,), generator=g).tolist()


def test_slots_of_the_whole_context_hold_memory_only_for_the_tokens_written() -> None:
    e = engine(LONG, max_batch=32)
    cache = e.cache
    assert cache.nbytes() >= 32 * 8192 * cache.token_bytes  # every slot its whole context
    assert cache.resident_bytes() == 0
    e.submit(prompt(20), GREEDY)
    e.step()  # the prompt's 20 positions and nothing else
    per_page = PAGE // (TINY.head_dim * 4)  # positions of one head in one page (fp32)
    assert 20 <= per_page
    heads = 2 * TINY.num_layers * TINY.num_kv_heads  # keys and values of each layer's heads
    assert cache.resident_bytes() == heads * PAGE


def test_a_finished_sequence_hands_its_pages_back_and_its_slot_reads_as_zeros() -> None:
    e = engine(LONG, max_batch=32)
    e.generate([prompt(300), prompt(40, 1)], GREEDY)
    assert e.cache.resident_bytes() == 0
    assert all(not t.any() for t in (*e.cache.k, *e.cache.v))  # no earlier user's keys


def test_release_zeroes_the_partial_pages_it_shares_with_its_neighbours() -> None:
    memory = ZeroPages(4 * PAGE)
    memory.bytes.fill_(7)
    memory.release(PAGE // 2, 2 * PAGE)  # half a page, a whole page, half a page
    assert memory.resident_bytes() == 3 * PAGE  # the whole page in the middle went back
    assert not memory.bytes[PAGE // 2 : PAGE // 2 + 2 * PAGE].any()
    assert (memory.bytes[: PAGE // 2] == 7).all()  # the neighbours keep theirs
    assert (memory.bytes[PAGE // 2 + 2 * PAGE :] == 7).all()


def test_the_cache_stays_out_of_core_dumps_and_off_huge_pages() -> None:
    cache = KVCache(TINY, 2, 64, torch.float32)
    assert {"dd", "nh"} <= cache.memory.flags()


def test_a_request_waits_until_the_kv_budget_holds_its_prompt_and_max_tokens() -> None:
    first, second = prompt(10), prompt(12, 1)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    e = engine(kv_tokens=64)  # one context: 50 + 52 positions do not fit together
    e.submit(first, params)
    e.submit(second, params)
    e.step()
    assert len(e.running) == 1 and len(e.waiting) == 1
    assert e.kv_reserved == 50
    outputs: dict[int, list[int]] = {0: [], 1: []}
    while e.has_work:
        for out in e.step():
            outputs[out.request_id].append(out.token_id)
    assert e.kv_reserved == 0
    alone = engine().generate([second], params)[0].token_ids
    assert outputs[1] == alone  # in the first one's released slot, as in a fresh engine


def test_choices_that_could_outgrow_the_kv_budget_are_refused_at_once() -> None:
    e = engine(kv_tokens=64)
    many = SamplingParams(max_tokens=40, n=2)
    with pytest.raises(UsageError, match="kv_cache_tokens"):
        e.submit(prompt(10), many)
    assert not e.has_work
    e.submit(prompt(10), SamplingParams(max_tokens=20, n=2))  # 2 x 30 fits


def test_a_kv_budget_below_one_context_is_refused() -> None:
    with pytest.raises(UsageError, match="at least one whole context"):
        engine(kv_tokens=63)
    with pytest.raises(SettingsError, match="kv_cache_tokens"):
        Settings(context_tokens=2048, kv_cache_tokens=2047)
    Settings(context_tokens=2048, kv_cache_tokens=0)  # every slot its whole context
