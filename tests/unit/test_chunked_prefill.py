"""Chunked prefill: a per-step prompt-token budget. Long prompts are prefilled in chunks between
decode steps and generate exactly what whole-prompt prefill generates; running streams get a
token at every step while a long prompt prefills."""

from __future__ import annotations

import pytest
import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.engine.chunking import plan_prefill
from tdllm.errors import UsageError
from tdllm.model.transformer import Transformer
from tdllm.settings import Settings, SettingsError, load_settings
from tests.protection.engine_runs import NoTokenizer
from tests.tiny_model import tiny_model

LONG = [(7 * i + 3) % 97 for i in range(30)]
PROMPTS = [[5, 17, 3, 42, 8], LONG, [9, 1, 60, 2], [33, 34, 35, 36, 37, 38, 39], [70]]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def engine(model: Transformer | None = None, chunk: int = 0, max_batch: int = 8) -> Engine:
    return Engine(model or tiny_model(), NoTokenizer(), max_batch, 48, prefill_chunk=chunk)  # type: ignore[arg-type]


def count_prefill_tokens(model: Transformer) -> list[int]:
    """Prompt tokens of every multi-token pass `model` runs, as they run."""
    seen: list[int] = []
    forward = model.forward

    def counting(tokens, batch, cache, last_only=True):  # type: ignore[no-untyped-def]
        if tokens.shape[1] > 1 or batch.starts == [0]:
            seen.append(sum(batch.lengths or [tokens.shape[1]] * tokens.shape[0]))
        return forward(tokens, batch, cache, last_only)

    model.forward = counting  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("chunk", [3, 5, 16])
def test_chunked_prefill_generates_the_tokens_of_whole_prompt_prefill(chunk: int) -> None:
    whole = [c.token_ids for c in engine().generate(PROMPTS, GREEDY)]
    chunked = [c.token_ids for c in engine(chunk=chunk).generate(PROMPTS, GREEDY)]
    assert chunked == whole


def test_no_step_prefills_more_prompt_tokens_than_the_budget() -> None:
    model = tiny_model()
    passes = count_prefill_tokens(model)
    e = engine(model, chunk=6)
    steps: list[int] = []
    for prompt in PROMPTS:
        e.submit(prompt, GREEDY)
    while e.has_work:
        before = len(passes)
        e.step()
        steps.append(sum(passes[before:]))
    assert max(steps) <= 6
    assert sum(steps) == sum(len(p) for p in PROMPTS)


def test_a_running_stream_gets_a_token_at_every_step_while_a_long_prompt_prefills() -> None:
    e = engine(chunk=4)
    running = e.submit([5, 17, 3], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    assert [o.request_id for o in e.step()] == [running]  # its prefill and first token
    long = e.submit(LONG, GREEDY)
    steps = 0
    while True:
        outputs = e.step()
        steps += 1
        assert running in [o.request_id for o in outputs]  # never a step without its token
        if long in [o.request_id for o in outputs]:
            break
    assert steps == -(-len(LONG) // 4)  # one chunk a step; the first token after the last
    alone = engine().generate([LONG], GREEDY)[0].token_ids
    rest = [o.token_id for _ in range(7) for o in e.step() if o.request_id == long]
    first = alone[0]
    assert [first, *rest] == alone


def test_cancel_during_a_chunked_prefill_frees_the_slot() -> None:
    e = engine(chunk=4, max_batch=2)
    request = e.submit(LONG, GREEDY)
    assert e.step() == []  # one chunk in, no token yet
    assert e.prefilling and len(e.free_slots) == 1
    e.cancel(request)
    assert not e.has_work and not e.prefilling and sorted(e.free_slots) == [0, 1]
    # the slot serves the next request as if nothing had been there
    again = [c.token_ids for c in e.generate([LONG], GREEDY)]
    assert again == [c.token_ids for c in engine().generate([LONG], GREEDY)]


def test_cancel_of_n_choices_during_a_chunked_prefill_frees_every_slot() -> None:
    e = engine(chunk=4, max_batch=3)
    request = e.submit(LONG, SamplingParams(max_tokens=4, n=3, seed=1))
    e.step()
    assert len(e.free_slots) == 0
    e.cancel(request)
    assert sorted(e.free_slots) == [0, 1, 2] and not e.running and not e._forks


def test_n_choices_share_one_chunked_prefill_and_sample_as_without_chunks() -> None:
    params = SamplingParams(max_tokens=6, n=3, seed=11, temperature=0.9, logprobs=2)
    model = tiny_model()
    passes = count_prefill_tokens(model)
    chunked = engine(model, chunk=7).generate([LONG], params)
    assert sum(passes) == len(LONG)  # prefilled once, for all three choices
    whole = engine().generate([LONG], params)
    assert [c.token_ids for c in chunked] == [c.token_ids for c in whole]
    for a, b in zip(chunked, whole, strict=True):  # the same up to fp32 rounding
        assert a.logprobs is not None and b.logprobs is not None
        got = [x.logprob for x in a.logprobs]
        assert got == pytest.approx([y.logprob for y in b.logprobs], abs=1e-4)


def test_penalties_bias_and_logprobs_survive_chunking() -> None:
    params = SamplingParams(
        max_tokens=8,
        temperature=0.0,
        ignore_eos=True,
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        logit_bias=((3, 2.0),),
        logprobs=3,
    )
    whole = engine().generate(PROMPTS, params)
    chunked = engine(chunk=4).generate(PROMPTS, params)
    assert [c.token_ids for c in chunked] == [c.token_ids for c in whole]
    for a, b in zip(chunked, whole, strict=True):
        assert a.logprobs is not None and b.logprobs is not None
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.token_id == y.token_id
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_short_prompts_keep_one_grouped_pass_and_wait_rather_than_be_cut() -> None:
    class Queued:
        def __init__(self, n: int, done: int = 0) -> None:
            self.prompt, self.prefilled = [0] * n, done

    a, b, c, long = Queued(3), Queued(4), Queued(5), Queued(40, 8)
    plan = plan_prefill([long, a, b, c], 16)
    assert [(len(r.prompt), n) for r, n in plan.chunks] == [(40, 16)]  # the running chunk first
    plan = plan_prefill([a, b, c, long], 10)
    assert plan.whole == [a, b] and plan.chunks == []  # c does not fit what is left: next step
    plan = plan_prefill([a, Queued(40)], 10)
    assert plan.whole == [a] and [n for _, n in plan.chunks] == [7]  # a long one takes the rest
    assert plan_prefill([a, b, long], 0).whole == [a, b, long]  # no budget: all whole


def test_a_bad_budget_is_one_clear_line() -> None:
    with pytest.raises(UsageError) as engine_error:
        engine(chunk=-1)
    assert "\n" not in str(engine_error.value) and "prefill_chunk" in str(engine_error.value)
    with pytest.raises(SettingsError) as settings_error:
        Settings(prefill_chunk=4)
    message = str(settings_error.value)
    assert "\n" not in message and "prefill_chunk must be 0" in message
    assert Settings(prefill_chunk=0).prefill_chunk == 0
    with pytest.raises(SettingsError) as env_error:
        load_settings(environ={"TDLLM_PREFILL_CHUNK": "lots"})
    assert "\n" not in str(env_error.value) and "prefill_chunk" in str(env_error.value)
    assert load_settings(environ={"TDLLM_PREFILL_CHUNK": "512"}).prefill_chunk == 512


def test_the_first_token_comes_after_the_last_chunk_only() -> None:
    e = engine(chunk=10)
    e.submit(LONG, GREEDY)
    with torch.inference_mode():
        assert e.step() == [] and e.step() == []
        assert len(e.step()) == 1


def test_the_stall_bench_reports_every_budget_and_chunks_take_more_steps() -> None:
    from tdllm_lab.bench.stall import format_report, run_stall
    from tests.sealing.synthetic import synthetic_checkpoint

    report = run_stall(synthetic_checkpoint(seed=2), torch.float32, [0, 8], 20, repeats=1)
    rows = {r["prefill_chunk"]: r for r in report["rows"]}
    assert rows[0]["steps_to_first_token"] == 1 and rows[8]["steps_to_first_token"] == 3
    assert all(r["stream_max_gap_ms"] > 0 and r["long_prompt_ttft_ms"] > 0 for r in rows.values())
    assert "off" in format_report(report)
