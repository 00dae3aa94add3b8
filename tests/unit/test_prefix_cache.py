"""Prefix caching: a prompt starting with blocks an earlier prompt prefilled gets their keys and
values copied and prefills only the rest, generating the tokens it generates without the cache;
the cache stays within its block budget, keys whole blocks only, and is never used where part
of the KV cache is elsewhere."""

from __future__ import annotations

import pytest
import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.errors import UsageError
from tdllm.model.transformer import Attention, Batch, Transformer
from tdllm.settings import Settings, SettingsError, load_settings
from tests.protection.engine_runs import NoTokenizer
from tests.tiny_model import TINY, tiny_model, tiny_tensors
from tests.unit.test_chunked_prefill import count_prefill_tokens

BLOCK = 4  # the tiny model's context is 64 positions: small blocks to have several
SYSTEM = [(7 * i + 3) % 97 for i in range(12)]  # three whole blocks
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def engine(model: Transformer, blocks: int, chunk: int = 0) -> Engine:
    return Engine(
        model,
        NoTokenizer(),  # type: ignore[arg-type]
        4,
        48,
        prefill_chunk=chunk,
        prefix_cache_blocks=blocks,
        prefix_block=BLOCK,
    )


def one_by_one(
    e: Engine, prompts: list[list[int]], params: SamplingParams = GREEDY
) -> list[list[int]]:
    """Each prompt run to completion before the next arrives (its blocks cached in between)."""
    return [c.token_ids for p in prompts for c in e.generate([p], params)]


def bf16_tiny_model() -> Transformer:
    model = Transformer(TINY, None, torch.bfloat16)
    with torch.no_grad():
        model.load_weights(tiny_tensors(TINY).items())
    return model.eval()


PROMPTS = [
    [*SYSTEM, 1, 2, 3],
    [*SYSTEM, 4, 5],  # the three system blocks
    [*SYSTEM[:6], 60, 61, 62],  # diverges mid-block 1: block 0 only
    SYSTEM,  # whole blocks only: the last block is prefilled, the first two come cached
    [9, 8, 7],
    [*SYSTEM, 1, 2, 3, 40, 41, 42, 43, 44],  # four blocks: the first prompt's three and one
]


@pytest.mark.parametrize("chunk", [0, 5])
def test_a_prompt_sharing_cached_blocks_prefills_only_the_rest(chunk: int) -> None:
    model = tiny_model()
    passes = count_prefill_tokens(model)
    e = engine(model, 16, chunk)
    e.generate([[*SYSTEM, 1, 2, 3]], GREEDY)
    assert sum(passes) == 15
    passes.clear()
    e.generate([[*SYSTEM, 4, 5]], GREEDY)
    assert sum(passes) == 2  # 12 tokens from the cache
    assert e.prefix_cache is not None and e.prefix_cache.hit_tokens == 12


@pytest.mark.parametrize("chunk", [0, 5])
def test_greedy_tokens_with_the_cache_equal_those_without_in_fp32(chunk: int) -> None:
    off = one_by_one(engine(tiny_model(), 0, chunk), PROMPTS)
    on = engine(tiny_model(), 16, chunk)
    assert one_by_one(on, PROMPTS) == off
    assert on.prefix_cache is not None and on.prefix_cache.hit_tokens == 12 + 4 + 8 + 12


def test_greedy_tokens_with_the_cache_equal_those_without_in_bf16() -> None:
    # cached keys and values are the numbers an earlier prefill wrote, but for a prompt of
    # another length: its matmuls' shapes differ, so they (and a continuation over them) may
    # differ from this prompt's whole pass in the last bits (one bf16 ulp of a logit here), as
    # a chunked or batched prefill's may. Tokens are equal here; a near tie could flip one
    # (greedy in fp32 is equal in practice: logits differ by ~1e-6)
    off = engine(bf16_tiny_model(), 0)
    on = engine(bf16_tiny_model(), 16)
    assert one_by_one(on, PROMPTS) == one_by_one(off, PROMPTS)
    prompt = SYSTEM + list(range(40, 70))  # 42 tokens; cached from the 15 of PROMPTS[0]
    logits = []
    with torch.inference_mode():
        for e in (off, on):
            e.submit(prompt, GREEDY)
            e._admit()
            request = e.prefilling[0]
            start = request.prefilled
            tokens = torch.tensor([prompt[start:]])
            batch = Batch([request.slot], [start], len(prompt) - start)
            logits.append(e.model(tokens, batch, e.cache)[0, -1].float())
            e.cancel(request.id)
    torch.testing.assert_close(logits[1], logits[0], atol=0.05, rtol=0.02)


def test_the_choices_of_a_request_starting_from_cached_blocks_sample_as_without() -> None:
    params = SamplingParams(max_tokens=6, temperature=0.9, seed=5, n=3)
    off = one_by_one(engine(tiny_model(), 0), PROMPTS[:2], params)
    assert one_by_one(engine(tiny_model(), 16), PROMPTS[:2], params) == off


def test_the_cache_keeps_at_most_its_budget_and_evicts_the_least_recently_used() -> None:
    model = tiny_model()
    passes = count_prefill_tokens(model)
    e = engine(model, 4)
    other = [(5 * i + 2) % 97 for i in range(13)]
    one_by_one(e, [[*SYSTEM, 1], other])  # 3 blocks, then 3 more in a 4-block budget
    cache = e.prefix_cache
    assert cache is not None and len(cache) == 4
    passes.clear()
    one_by_one(e, [[*other[:12], 50, 51]])  # the newer prompt's blocks all stayed
    assert sum(passes) == 2
    passes.clear()
    one_by_one(e, [[*SYSTEM, 50]])  # the older lost its last blocks first: its root is left
    assert sum(passes) == 13 - BLOCK
    assert len(cache) == 4


def test_a_prompt_diverging_mid_block_reuses_only_the_whole_blocks_before_it() -> None:
    model = tiny_model()
    passes = count_prefill_tokens(model)
    e = engine(model, 16)
    one_by_one(e, [[*SYSTEM, 1]])
    passes.clear()
    one_by_one(e, [[*SYSTEM[:6], 90, 91, 92, 93]])  # agrees on 6 tokens: 1 whole block
    assert sum(passes) == 10 - BLOCK


def test_a_prompt_of_whole_cached_blocks_still_prefills_its_last_block() -> None:
    model = tiny_model()
    passes = count_prefill_tokens(model)
    e = engine(model, 16)
    one_by_one(e, [[*SYSTEM, 1]])
    passes.clear()
    one_by_one(e, [SYSTEM])  # its first token's logits come from a real pass
    assert sum(passes) == BLOCK


class ZeroCore:
    """An attention core that keeps its state to itself (as obfuscated's does): no cache rows."""

    def __call__(self, x, batch, k_cache, v_cache):  # type: ignore[no-untyped-def]
        return torch.zeros(x.shape[0], x.shape[1], TINY.num_heads * TINY.head_dim)


def test_a_model_whose_kv_is_partly_elsewhere_never_uses_the_cache() -> None:
    model = tiny_model()
    for module in model.modules():
        if isinstance(module, Attention):
            module.core = ZeroCore()
    passes = count_prefill_tokens(model)
    e = engine(model, 16)
    assert not e.shares_prefill and e.prefix_cache is None
    one_by_one(e, [[*SYSTEM, 1], [*SYSTEM, 2]])
    assert passes == [13, 13]


def test_a_bad_prefix_cache_setting_is_one_clear_line() -> None:
    with pytest.raises(UsageError) as engine_error:
        engine(tiny_model(), -1)
    assert "\n" not in str(engine_error.value) and "prefix_cache_blocks" in str(engine_error.value)
    with pytest.raises(SettingsError) as settings_error:
        Settings(prefix_cache_blocks=-1)
    message = str(settings_error.value)
    assert "\n" not in message and "prefix_cache_blocks must be 0" in message
    assert Settings().prefix_cache_blocks == 128  # on: one whole context of blocks, per scope
    with pytest.raises(SettingsError) as env_error:
        load_settings(environ={"TDLLM_PREFIX_CACHE_BLOCKS": "lots"})
    assert "\n" not in str(env_error.value) and "prefix_cache_blocks" in str(env_error.value)
    assert load_settings(environ={"TDLLM_PREFIX_CACHE_BLOCKS": "32"}).prefix_cache_blocks == 32


def test_a_prompt_from_another_scope_never_hits_the_prefix_cache() -> None:
    """The attack: a tenant times its first token to learn whether another tenant's prompt
    starts with a guess (a cached block is ~9x faster). Blocks are kept per scope (the API key):
    another scope's identical prompt misses, and it is computed as if nothing were cached."""
    e = engine(tiny_model(), 16)
    victim = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, cache_scope=b"A")
    prober = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, cache_scope=b"B")
    tokens = one_by_one(e, [[*SYSTEM, 1]], victim)
    cache = e.prefix_cache
    assert cache is not None and cache.hit_tokens == 0
    assert one_by_one(e, [[*SYSTEM, 1]], prober) == tokens
    assert cache.hit_tokens == 0  # the guess told the prober nothing
    one_by_one(e, [[*SYSTEM, 2]], victim)
    assert cache.hit_tokens == len(SYSTEM)  # the victim's own prompts still share
    one_by_one(e, [[*SYSTEM, 3]], prober)
    assert cache.hit_tokens == 2 * len(SYSTEM)  # and so do the prober's, among themselves
    assert "cache_scope" not in repr(prober)  # never in a log line


@pytest.mark.slow  # the bundled model, four engines: ~15 s quiet
def test_the_prefix_cache_bench_reports_off_and_on_with_equal_greedy_tokens() -> None:
    from tdllm.sources import open_checkpoint
    from tdllm_lab.bench.prefix_cache import format_report, run_prefix_cache

    report = run_prefix_cache(open_checkpoint("bundled"), torch.float32, 128, 4, repeats=1)
    assert [r["prefix_cache_blocks"] for r in report["rows"]] == [0, 4]
    assert report["greedy_tokens_equal"] is True
    assert all(len(r["runs_ms"]) == 1 for r in report["rows"])
    assert "TTFT best" in format_report(report)
