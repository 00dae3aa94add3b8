"""The generation loop: prefill new prompts into cache slots (several per pass where the model
allows), then one batched decode step for every running sequence.

A request asks for `n` choices (`SamplingParams.n`): n sequences, one slot each, admitted
together. Where the whole KV cache is this engine's (`Engine.shares_prefill`), the prompt is
prefilled once, into the first choice's slot, and its cache rows are copied into the other
choices' slots; every choice samples its first token from that one pass's logits with its own
generator. Elsewhere (a profile whose prefix or attention keeps state on a device) each choice is
prefilled on its own.

With a per-step budget (`prefill_chunk`), a step prefills at most that many prompt tokens and a
longer prompt is prefilled in chunks over several steps (chunking.py), so a long prompt arriving
delays the running streams' next token by one chunk's prefill, not its whole prefill; its first
token is sampled after its last chunk.

With a prefix cache (`prefix_cache_blocks`, prefix_cache.py; only where `shares_prefill`), a
prompt's whole leading blocks are kept after its prefill, and a later prompt starting with the
same blocks gets their cache rows copied into its slot on admission and prefills only the rest,
as a continuation (like a chunk).

The KV cache offers every slot the whole context but holds memory only for what its sequences
wrote (`KVCache`, pages on demand; a finished sequence's slot is released at once). What bounds
that memory is the KV budget (`kv_tokens`): a request is admitted only while every admitted
sequence's worst case (its prompt plus `max_tokens`, within the context) fits the budget, so the
cache never holds more than `kv_tokens` positions and no running sequence can run out of room
(nothing is preempted or recomputed). A sequence that stops early gives its reservation back.

A sequence whose params ask for `logprobs` gets each token's log-probability and the top
alternatives (`StepOutput.logprobs`), computed from the very logits row its token was sampled
from, for all such sequences of a step together (`LogprobTable`); the others cost nothing."""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import llguidance
import torch

from tdllm.engine.chunking import check_budget, plan_prefill, prefill_groups
from tdllm.engine.outputs import Completion, StepOutput
from tdllm.engine.prefix_cache import PREFIX_BLOCK, PrefixCache, check_prefix_cache
from tdllm.engine.prompt_check import check_prompt
from tdllm.engine.sampling import (
    LogitsProcessor,
    LogprobTable,
    SamplingParams,
    TokenLogprobs,
    sample,
)
from tdllm.engine.stops import TextStream
from tdllm.engine.structured import Grammars
from tdllm.errors import UsageError
from tdllm.model.compile_modes import COMPILE_MODES
from tdllm.model.compiled_decode import compile_decode, warm_up
from tdllm.model.tokenizer import Tokenizer
from tdllm.model.transformer import Attention, Batch, KVCache, Transformer

log = logging.getLogger(__name__)


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    stream: TextStream
    generator: torch.Generator
    index: int = 0  # which choice of its request; the choices of one request share `id`
    processor: LogitsProcessor | None = None  # penalties, logit_bias, min_tokens (when asked)
    matcher: llguidance.LLMatcher | None = None  # structured output: where the grammar stands
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the slot's cache (chunked prefill)
    reserved: int = 0  # cache positions held for it in the engine's KV budget
    output: list[int] = field(default_factory=list)

    @property
    def position(self) -> int:  # cache position of the next token to feed
        return len(self.prompt) + len(self.output) - 1


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        prefill_chunk: int = 0,
        prefix_cache_blocks: int = 0,
        prefix_block: int = PREFIX_BLOCK,
        compile: str = "off",
        status: Callable[[str], None] = lambda _: None,
        kv_tokens: int = 0,
    ) -> None:
        check_budget(prefill_chunk)
        check_prefix_cache(prefix_cache_blocks, prefix_block)
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = min(
            max_seq_len or model.cfg.max_position_embeddings, model.cfg.max_position_embeddings
        )
        self.cache = KVCache(model.cfg, max_batch, self.max_seq_len, model.dtype)
        self.free_slots = list(range(max_batch))
        # cache positions the admitted sequences may fill at most, all together (0: every slot
        # its whole context, the worst case); a single sequence always fits
        self.kv_tokens = kv_tokens or max_batch * self.max_seq_len
        if self.kv_tokens < self.max_seq_len:
            raise UsageError(
                f"the KV budget is {kv_tokens} tokens; it must hold at least one whole context "
                f"({self.max_seq_len} tokens), or be 0 (every slot's whole context)"
            )
        self.kv_reserved = 0  # what the admitted sequences reserved of `kv_tokens`
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []  # every request holding a slot
        self.prefilling: list[_Request] = []  # admitted, prompt not all in the cache yet
        self._forks: dict[int, list[_Request]] = {}  # choices waiting for choice 0's prefill
        # prompt tokens one step prefills at most (0: every prompt whole). Every placement
        # prefills a continuation (one sequence from any start: split's device prefix,
        # masked's linears, obfuscated's attention core), so no model needs whole prompts
        self.prefill_chunk = prefill_chunk
        self._ids = itertools.count()
        self.batched_prefill = model.prefills_together()
        # the n choices of a request share one prefill (its cache rows copied) only where every
        # layer's keys and values are in `cache`: no prefix run elsewhere, no attention core
        self.shares_prefill = model.prefix is None and all(
            m.core is None for m in model.modules() if isinstance(m, Attention)
        )
        # prompts' leading blocks kept across requests (0 blocks: off); only where the whole KV
        # is in `cache`, as for sharing a prefill: elsewhere part of it is on a device
        self.prefix_cache = (
            PrefixCache(model.cfg, prefix_cache_blocks, prefix_block, model.dtype)
            if prefix_cache_blocks and self.shares_prefill
            else None
        )
        self.grammars = Grammars(tokenizer, model.cfg.vocab_size)
        # decode steps as one compiled graph (`compiled_decode`), traced now, not by a request
        self.compile_seconds = 0.0
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}")
        if compile != "off" and model.decodes_in_one_call():
            log.warning(
                "compile %r not applied: every block's decode step already runs as one op on "
                "the AVX2 kernels, faster than compiled graphs (docs/performance.md, 'One call "
                "a block')",
                compile,
            )
            compile = "off"
        if compile != "off":
            compile_decode(model, grouped=compile == "decode-groups")
            self.compile_seconds = warm_up(model, self.cache, max_batch, self.max_seq_len, status)
        # a lone sequence moves to slot 0, where the compiled step has a one-row graph; only
        # where its whole KV is in `cache` (a device prefix keeps its own by slot)
        self.moves_lone_sequence = compile != "off" and self.shares_prefill

    # -- requests -------------------------------------------------------------------------------

    def check_prompt(self, prompt: Sequence[int]) -> None:
        """Raise `PromptError` (a `UsageError`) for a prompt this engine cannot run (never fails
        later)."""
        check_prompt(prompt, vocab_size=self.model.cfg.vocab_size, context=self.max_seq_len)

    def check_params(self, params: SamplingParams) -> None:
        """Raise `UsageError` for sampling parameters this engine cannot run: more choices than
        it has slots (they run together), a logit_bias token outside the vocabulary."""
        slots = self.cache.max_batch
        if params.n > slots:
            raise UsageError(f"n is {params.n}; this engine runs at most {slots} sequences")
        vocab = self.model.cfg.vocab_size
        if any(token >= vocab for token, _ in params.logit_bias):
            raise UsageError(f"logit_bias token ids must be in [0, {vocab})")
        if params.grammar is not None:
            problem = self.grammars.problem(params.grammar)
            if problem:
                raise UsageError(f"the grammar cannot run: {problem}")

    def check_fits(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise `UsageError` for a request whose choices together could outgrow the KV budget
        (it would never be admitted): n choices of a long prompt and `max_tokens`."""
        need = params.n * self.kv_need(len(prompt), params)
        if need > self.kv_tokens:
            raise UsageError(
                f"n = {params.n} choices of a {len(prompt)}-token prompt and max_tokens "
                f"{params.max_tokens} need up to {need} tokens of KV cache; this engine holds "
                f"at most {self.kv_tokens} (kv_cache_tokens)"
            )

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> int:
        """Queue `prompt` for `params.n` choices; their outputs carry the id returned."""
        self.check_prompt(prompt)
        self.check_params(params)
        self.check_fits(prompt, params)
        request_id = next(self._ids)
        vocab = self.model.cfg.vocab_size
        for index in range(params.n):  # contiguous in `waiting`: admitted together
            processor = None
            if params.processes_logits:
                stops = self.tokenizer.stop_token_ids
                processor = LogitsProcessor(params, prompt, vocab, stops)
            matcher = None
            if params.grammar is not None:
                matcher = self.grammars.matcher(params.grammar)
            self.waiting.append(
                _Request(
                    request_id,
                    list(prompt),
                    params,
                    TextStream(self.tokenizer, params.stop, params.min_tokens),
                    params.generator(index),
                    index,
                    processor,
                    matcher,
                )
            )
        return request_id

    def cancel(self, request_id: int) -> None:
        """Forget a request, every choice of it (a client went away); slots are freed at once."""
        self.waiting = deque(r for r in self.waiting if r.id != request_id)
        for r in [r for r in self.running if r.id == request_id]:
            self._finish(r)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- stepping -------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Admit waiting requests into free slots, prefill what the budget allows (first
        tokens for prompts now complete), then one decode step for the sequences that had
        a token already."""
        outputs: list[StepOutput] = []
        if self.moves_lone_sequence:
            self._move_lone_sequence_to_slot_0()
        decoding = [r for r in self.running if r.output]
        self._admit()
        plan = plan_prefill(self.prefilling, self.prefill_chunk)
        # a prompt that starts from a cached prefix is a continuation even when whole
        whole = [r for r in plan.whole if not r.prefilled]
        rest = [(r, len(r.prompt) - r.prefilled) for r in plan.whole if r.prefilled]
        for group in self._prefill_groups(whole):
            outputs.extend(self._prefill(group))
        for request, count in [*rest, *plan.chunks]:
            outputs.extend(self._prefill_chunk(request, count))
        if decoding:
            decoding.sort(key=lambda r: r.slot)  # contiguous slots read the cache as a view
            tokens = torch.tensor([[r.output[-1]] for r in decoding])
            batch = Batch([r.slot for r in decoding], [r.position for r in decoding], 1)
            logits = self.model(tokens, batch, self.cache)
            allowed = self._allowed(decoding)
            logprobs = self._logprobs(decoding, logits[:, -1])
            outputs.extend(
                self._advance(r, logits[i, -1], allowed.get(i), logprobs.get(i))
                for i, r in enumerate(decoding)
            )
        self.free_slots.sort()
        return outputs

    def kv_need(self, prompt_tokens: int, params: SamplingParams) -> int:
        """Cache positions one choice of a request reserves while it runs: its prompt and
        `max_tokens`, within the context."""
        return min(prompt_tokens + params.max_tokens, self.max_seq_len)

    def _admit(self) -> None:
        """Slots for waiting requests, a request's choices all at once, in order of arrival
        (none overtakes a larger one), while the KV budget holds their worst case. Where
        choices share a prefill, choices 1.. wait for choice 0's (`_forks`) instead of
        prefilling."""
        while self.waiting and len(self.free_slots) >= self.waiting[0].params.n:
            first = self.waiting[0]
            need = first.params.n * self.kv_need(len(first.prompt), first.params)
            if self.kv_reserved + need > self.kv_tokens:
                break
            for _ in range(first.params.n):
                request = self.waiting.popleft()
                request.slot = self.free_slots.pop(0)
                request.reserved = self.kv_need(len(request.prompt), request.params)
                self.kv_reserved += request.reserved
                self.running.append(request)
                if self.shares_prefill and request.index:
                    self._forks.setdefault(request.id, []).append(request)
                else:
                    if self.prefix_cache is not None:
                        request.prefilled = self.prefix_cache.lookup(
                            request.prompt, self.cache, request.slot, request.params.cache_scope
                        )
                    self.prefilling.append(request)

    def _prefill_groups(self, admitted: list[_Request]) -> list[list[_Request]]:
        """Prompts that share one padded pass (`chunking.prefill_groups`)."""
        return prefill_groups(admitted, self.batched_prefill)

    def _prefill(self, group: list[_Request]) -> list[StepOutput]:
        """Each prompt into its slot's cache from position 0, then its first token."""
        lengths = [len(r.prompt) for r in group]
        width = max(lengths)
        tokens = torch.tensor([r.prompt + [0] * (width - len(r.prompt)) for r in group])
        batch = Batch([r.slot for r in group], [0] * len(group), width, lengths)
        logits = self.model(tokens, batch, self.cache)
        return self._first_tokens(group, logits)

    def _prefill_chunk(self, request: _Request, count: int) -> list[StepOutput]:
        """The next `count` prompt tokens into the slot's cache, a continuation from where the
        last chunk ended; the first token only after the last chunk."""
        start = request.prefilled
        tokens = torch.tensor([request.prompt[start : start + count]])
        logits = self.model(tokens, Batch([request.slot], [start], count), self.cache)
        request.prefilled += count
        if request.prefilled < len(request.prompt):
            return []
        return self._first_tokens([request], logits)

    def _first_tokens(self, group: list[_Request], logits: torch.Tensor) -> list[StepOutput]:
        """Prompts of `group` are all in the cache (`logits` their last rows): the first token
        of each; the request's other choices waiting in `_forks` get the prompt's cache rows
        and sample their first token from the same logits."""
        done = {id(r) for r in group}
        self.prefilling = [r for r in self.prefilling if id(r) not in done]
        forks = {r.id: self._forks.pop(r.id, []) for r in group}
        rows = [(i, r) for i, request in enumerate(group) for r in [request, *forks[request.id]]]
        for _, r in rows:
            r.prefilled = len(r.prompt)
        if self.prefix_cache is not None:  # before any may finish and free its slot
            for request in group:
                self.prefix_cache.store(
                    request.prompt, self.cache, request.slot, request.params.cache_scope
                )
        allowed = self._allowed([r for _, r in rows])
        logprobs = self._logprobs([r for _, r in rows], logits[[i for i, _ in rows], -1])
        for request in group:
            for fork in forks[request.id]:  # before the first choice may finish
                self._copy_prompt_cache(request, fork)
        return [
            self._advance(r, logits[i, -1], allowed.get(k), logprobs.get(k))
            for k, (i, r) in enumerate(rows)
        ]

    def _allowed(self, requests: Sequence[_Request]) -> dict[int, torch.Tensor]:
        """The tokens the grammar allows next, by position in `requests`, for the constrained
        ones: their masks computed together (one parallel call)."""
        constrained = [(k, r.matcher) for k, r in enumerate(requests) if r.matcher is not None]
        if not constrained:
            return {}
        masks = self.grammars.allowed([m for _, m in constrained])
        return {k: masks[j] for j, (k, _) in enumerate(constrained)}

    def _logprobs(
        self, requests: Sequence[_Request], rows: torch.Tensor
    ) -> dict[int, tuple[LogprobTable, int]]:
        """For the requests that ask for logprobs, by position in `requests`: their rows of
        `rows` (``[len(requests), vocab]``, the raw logits) in one table, and their row in it."""
        asking = [k for k, r in enumerate(requests) if r.params.logprobs is not None]
        if not asking:
            return {}
        counts = [requests[k].params.logprobs or 0 for k in asking]
        table = LogprobTable(rows[asking], counts)
        return {k: (table, j) for j, k in enumerate(asking)}

    def _move_lone_sequence_to_slot_0(self) -> None:
        """The only running sequence, decoding in a slot other than 0 (the others finished),
        moves to slot 0: the compiled step runs one row in slot 0 as a graph of its own, and a
        lone row elsewhere through the two-row graph at nearly twice the int kernels' cost
        (`DecodeWindow.covering`). Its cache rows are copied once and its old slot released."""
        if len(self.running) != 1 or 0 not in self.free_slots:
            return
        request = self.running[0]
        if not request.output:  # still prefilling: it moves once it decodes
            return
        self._copy_cache_rows(request.slot, 0, request.position)  # the positions it holds
        self.cache.release(request.slot)
        self.free_slots.remove(0)
        self.free_slots.append(request.slot)
        self.free_slots.sort()
        request.slot = 0

    def _copy_prompt_cache(self, source: _Request, target: _Request) -> None:
        """The keys and values of `source`'s prompt into `target`'s slot (the same prompt)."""
        self._copy_cache_rows(source.slot, target.slot, len(source.prompt))

    def _copy_cache_rows(self, source: int, target: int, length: int) -> None:
        """Every layer's keys and values of the first `length` positions, slot to slot."""
        for layer in (*self.cache.k, *self.cache.v):
            layer[target, :, :length] = layer[source, :, :length]

    def _advance(
        self,
        request: _Request,
        logits: torch.Tensor,
        allowed: torch.Tensor | None = None,
        logprobs: tuple[LogprobTable, int] | None = None,
    ) -> StepOutput:
        out = self._next(request, logits, allowed)
        if logprobs is not None:
            table, row = logprobs
            out.logprobs = table.of(row, out.token_id)
        return out

    def _next(
        self, request: _Request, logits: torch.Tensor, allowed: torch.Tensor | None
    ) -> StepOutput:
        processor = request.processor
        if processor is not None:
            logits = processor(logits)
        if allowed is not None:  # last, as vLLM applies structured output's mask
            if not allowed.any():  # a grammar nothing can satisfy: end as at a stop token
                token = min(self.tokenizer.stop_token_ids)
                request.output.append(token)
                return self._end(request, token, request.stream.flush(), "stop")
            logits = logits.float().masked_fill(~allowed, -math.inf)
        token = sample(logits, request.params, request.generator)
        if processor is not None:
            processor.add(token)
        request.output.append(token)
        matcher = request.matcher
        if matcher is not None:
            matcher.consume_token(token)
        if token in self.tokenizer.stop_token_ids and not request.params.ignore_eos:
            return self._end(request, token, request.stream.flush(), "stop")
        text = request.stream.push(token)
        if request.stream.stopped:
            return self._end(request, token, text, "stop")
        if matcher is not None and matcher.is_stopped():  # complete: nothing more may follow
            return self._end(request, token, text + request.stream.flush(), "stop")
        full = len(request.output) >= request.params.max_tokens
        if full or request.position >= self.max_seq_len:  # no room to feed this token back
            return self._end(request, token, text + request.stream.flush(), "length")
        return StepOutput(request.id, token, text, None, request.index)

    def _end(self, request: _Request, token: int, text: str, reason: str) -> StepOutput:
        self._finish(request)
        return StepOutput(request.id, token, text, reason, request.index)

    def _finish(self, request: _Request) -> None:
        self.running.remove(request)
        if request.prefilled < len(request.prompt):  # cancelled before its first token
            self.prefilling = [r for r in self.prefilling if r is not request]
            self._forks.pop(request.id, None)
        self.cache.release(request.slot)
        self.free_slots.append(request.slot)
        self.kv_reserved -= request.reserved
        request.slot = -1

    # -- conveniences ---------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        """Run `prompts` to completion together; results in the order given, each prompt's
        `n` choices in order."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        for prompt, sp in zip(prompts, per_prompt, strict=True):
            self.check_prompt(prompt)
            self.check_params(sp)
            self.check_fits(prompt, sp)
        ids = [self.submit(p, sp) for p, sp in zip(prompts, per_prompt, strict=True)]
        keys = [(i, c) for i, sp in zip(ids, per_prompt, strict=True) for c in range(sp.n)]
        done: dict[tuple[int, int], Completion] = {}
        tokens: dict[tuple[int, int], list[int]] = {k: [] for k in keys}
        texts: dict[tuple[int, int], list[str]] = {k: [] for k in keys}
        logprobs: dict[tuple[int, int], list[TokenLogprobs]] = {k: [] for k in keys}
        while len(done) < len(keys):
            for out in self.step():
                key = (out.request_id, out.index)
                tokens[key].append(out.token_id)
                texts[key].append(out.text)
                if out.logprobs is not None:
                    logprobs[key].append(out.logprobs)
                if out.finish_reason:
                    prompt_len = len(prompts[ids.index(out.request_id)])
                    done[key] = Completion(
                        out.request_id,
                        prompt_len,
                        tokens[key],
                        "".join(texts[key]),
                        out.finish_reason,
                        out.index,
                        logprobs[key] if out.logprobs is not None else None,
                    )
        return [done[k] for k in keys]

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[StepOutput]:
        """Generate for one prompt alone, yielding each step's output (of any of its `n`
        choices) as it comes."""
        request_id = self.submit(prompt, params)
        left = params.n
        while True:
            for out in self.step():
                if out.request_id == request_id:
                    yield out
                    left -= bool(out.finish_reason)
                    if not left:
                        return
