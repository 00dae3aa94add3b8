"""The generation loop: prefill new prompts into cache slots (several per pass where the model
allows), then one batched decode step for every running sequence."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from tdllm.engine.prompt_check import check_prompt
from tdllm.engine.sampling import SamplingParams, sample
from tdllm.engine.stops import TextStream
from tdllm.model.tokenizer import Tokenizer
from tdllm.model.transformer import Batch, KVCache, Transformer

# the most padded prompt tokens one prefill pass takes: prompts arriving together share a pass
# (one walk over the weights) without one long prompt making a huge padded batch
PREFILL_TOKENS = 2048


@dataclass
class StepOutput:
    """What one step produced for one request: a token, the text it made final, and the end."""

    request_id: int
    token_id: int
    text: str
    finish_reason: str | None  # "stop" (eos or stop string), "length", or None while running


@dataclass
class Completion:
    request_id: int
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    stream: TextStream
    generator: torch.Generator
    slot: int = -1
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
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = min(
            max_seq_len or model.cfg.max_position_embeddings, model.cfg.max_position_embeddings
        )
        self.cache = KVCache(model.cfg, max_batch, self.max_seq_len, model.dtype)
        self.free_slots = list(range(max_batch))
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self._ids = itertools.count()
        self.batched_prefill = model.prefills_together()

    # -- requests -------------------------------------------------------------------------------

    def check_prompt(self, prompt: Sequence[int]) -> None:
        """Raise `PromptError` (a `UsageError`) for a prompt this engine cannot run (never fails
        later)."""
        check_prompt(prompt, vocab_size=self.model.cfg.vocab_size, context=self.max_seq_len)

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> int:
        self.check_prompt(prompt)
        request = _Request(
            next(self._ids),
            list(prompt),
            params,
            TextStream(self.tokenizer, params.stop),
            params.generator(),
        )
        self.waiting.append(request)
        return request.id

    def cancel(self, request_id: int) -> None:
        """Forget a request (a client went away); its slot is freed at once."""
        self.waiting = deque(r for r in self.waiting if r.id != request_id)
        for r in [r for r in self.running if r.id == request_id]:
            self._finish(r)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- stepping -------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Admit waiting requests into free slots (prefill), then one decode step for the rest."""
        outputs: list[StepOutput] = []
        decoding = list(self.running)
        admitted = []
        while self.waiting and self.free_slots:
            request = self.waiting.popleft()
            request.slot = self.free_slots.pop(0)
            self.running.append(request)
            admitted.append(request)
        for group in self._prefill_groups(admitted):
            outputs.extend(self._prefill(group))
        if decoding:
            decoding.sort(key=lambda r: r.slot)  # contiguous slots read the cache as a view
            tokens = torch.tensor([[r.output[-1]] for r in decoding])
            batch = Batch([r.slot for r in decoding], [r.position for r in decoding], 1)
            logits = self.model(tokens, batch, self.cache)
            outputs.extend(self._advance(r, logits[i, -1]) for i, r in enumerate(decoding))
        self.free_slots.sort()
        return outputs

    def _prefill_groups(self, admitted: list[_Request]) -> list[list[_Request]]:
        """Prompts that share one padded forward pass: similar lengths (padding at most half of
        a row) and at most `PREFILL_TOKENS` padded tokens; one prompt per pass where the model
        cannot batch them (`Transformer.prefills_together`)."""
        if not self.batched_prefill:
            return [[r] for r in admitted]
        groups: list[list[_Request]] = []
        for request in sorted(admitted, key=lambda r: len(r.prompt)):
            group = groups[-1] if groups else None
            longest = len(request.prompt)
            if (
                group is not None
                and longest <= 2 * len(group[0].prompt)
                and longest * (len(group) + 1) <= PREFILL_TOKENS
            ):
                group.append(request)
            else:
                groups.append([request])
        return groups

    def _prefill(self, group: list[_Request]) -> list[StepOutput]:
        """Each prompt into its slot's cache from position 0, then its first token."""
        lengths = [len(r.prompt) for r in group]
        width = max(lengths)
        tokens = torch.tensor([r.prompt + [0] * (width - len(r.prompt)) for r in group])
        batch = Batch([r.slot for r in group], [0] * len(group), width, lengths)
        logits = self.model(tokens, batch, self.cache)
        return [self._advance(r, logits[i, -1]) for i, r in enumerate(group)]

    def _advance(self, request: _Request, logits: torch.Tensor) -> StepOutput:
        token = sample(logits, request.params, request.generator)
        request.output.append(token)
        if token in self.tokenizer.stop_token_ids and not request.params.ignore_eos:
            return self._end(request, token, request.stream.flush(), "stop")
        text = request.stream.push(token)
        if request.stream.stopped:
            return self._end(request, token, text, "stop")
        full = len(request.output) >= request.params.max_tokens
        if full or request.position >= self.max_seq_len:  # no room to feed this token back
            return self._end(request, token, text + request.stream.flush(), "length")
        return StepOutput(request.id, token, text, None)

    def _end(self, request: _Request, token: int, text: str, reason: str) -> StepOutput:
        self._finish(request)
        return StepOutput(request.id, token, text, reason)

    def _finish(self, request: _Request) -> None:
        self.running.remove(request)
        self.free_slots.append(request.slot)
        request.slot = -1

    # -- conveniences ---------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        """Run `prompts` to completion together; results in the order given."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        for prompt in prompts:
            self.check_prompt(prompt)
        ids = [self.submit(p, sp) for p, sp in zip(prompts, per_prompt, strict=True)]
        done: dict[int, Completion] = {}
        tokens: dict[int, list[int]] = {i: [] for i in ids}
        texts: dict[int, list[str]] = {i: [] for i in ids}
        while len(done) < len(ids):
            for out in self.step():
                tokens[out.request_id].append(out.token_id)
                texts[out.request_id].append(out.text)
                if out.finish_reason:
                    prompt_len = len(prompts[ids.index(out.request_id)])
                    done[out.request_id] = Completion(
                        out.request_id,
                        prompt_len,
                        tokens[out.request_id],
                        "".join(texts[out.request_id]),
                        out.finish_reason,
                    )
        return [done[i] for i in ids]

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[StepOutput]:
        """Generate for one prompt alone, yielding each step's output as it comes."""
        request_id = self.submit(prompt, params)
        while True:
            for out in self.step():
                if out.request_id == request_id:
                    yield out
                    if out.finish_reason:
                        return
