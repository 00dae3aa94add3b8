"""Structured outputs: JSON constrained by a grammar while it is sampled (llguidance).

A request's `SamplingParams.grammar` (llguidance's grammar, built from a JSON Schema by
`json_grammar`) gets a matcher per choice. Each engine step computes the allowed-token bitmask
of every constrained row together (`Grammars.allowed`, llguidance's parallel executor), the
sampler sees -inf everywhere else (after logit_bias, penalties and min_tokens, as vLLM applies
it), and the sampled token advances the matcher. The stop tokens are allowed only where the
grammar accepts; once it can take nothing more the sequence ends ("stop").

JSON is written compactly (no free whitespace between tokens: a small model at temperature 1
could otherwise fill max_tokens with it)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import llguidance
import torch

from tdllm.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# a json_schema's schema as compact JSON text; its nesting is bounded by the request body's
# (strict_json.MAX_JSON_DEPTH: 32 levels, the schema starting at level 4)
MAX_SCHEMA_BYTES = 64 * 1024
_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "lenient": False}
_SHIFTS = torch.arange(32, dtype=torch.int32)
# llguidance's parallel executor takes half the cores (torch's forward pass has the rest; its
# workers spin a while after each batch); with fewer than 4 cores the rows are computed one after
# the other in the same call: on 2 cores the executor cost 12 ms a step at b=8, the loop 1.7 ms
_MASK_THREADS = (os.cpu_count() or 1) // 2


def json_grammar(schema: dict[str, Any] | None) -> str:
    """llguidance's grammar for JSON valid under `schema` (None: any JSON object). Raises
    `ValueError` with a one-line reason for a schema it cannot take (before any tokenizer: see
    `Grammars.problem` for the rest)."""
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise ValueError("the schema must be a JSON object")
    if "x-guidance" in schema:
        raise ValueError("x-guidance is not accepted")
    if len(json.dumps(schema, separators=(",", ":"))) > MAX_SCHEMA_BYTES:
        raise ValueError(f"the schema is longer than {MAX_SCHEMA_BYTES} bytes")
    grammar: str = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_OPTIONS)
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise ValueError(_one_line(problem))
    return grammar


def json_rule(schema: dict[str, Any]) -> str:
    """A lark rule's body that matches JSON valid under `schema` (already accepted by
    `json_grammar`), written as `json_grammar` writes it: compact, not lenient."""
    return "%json " + json.dumps(schema | {"x-guidance": dict(_OPTIONS)}, separators=(",", ":"))


def lark_grammar(lark: str) -> str:
    """llguidance's grammar for a lark text (with `json_rule`s in it). Raises `ValueError` with
    a one-line reason for one it cannot take."""
    grammar: str = llguidance.LLMatcher.grammar_from_lark(lark)
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise ValueError(_one_line(problem))
    return grammar


def _one_line(message: str) -> str:
    return " ".join(message.split())


class Grammars:
    """The tokenizer as llguidance sees it (built once, on first use: ~0.2 s) and the executor
    that computes several matchers' masks in parallel."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._ll: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                stops = sorted(t for t in self._tokenizer.stop_token_ids if t < self.vocab_size)
                self._ll = llguidance.LLTokenizer(
                    self._tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=stops
                )
                if _MASK_THREADS >= 2:
                    self._executor = llguidance.LLExecutor(num_threads=_MASK_THREADS)
            return self._ll

    def problem(self, grammar: str) -> str | None:
        """Why `grammar` cannot run with this tokenizer (one line), or None."""
        message = llguidance.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        return _one_line(message) if message else None

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(_one_line(matcher.get_error()))
        return matcher

    def allowed(self, matchers: Sequence[llguidance.LLMatcher]) -> torch.Tensor:
        """The tokens each matcher allows next, ``[len(matchers), vocab]`` bool, computed
        together (in parallel where there are cores to spare)."""
        self.ll_tokenizer  # noqa: B018 (the executor comes with it)
        # llguidance.torch's helpers do this, but importing that module runs torch.compile
        words = (self.vocab_size + 31) // 32
        bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)
        if self._executor is None or len(matchers) == 1:
            for i, matcher in enumerate(matchers):
                matcher.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), words * 4)
        else:
            pairs = [(m, i) for i, m in enumerate(matchers)]
            self._executor.unsafe_compute_mask_ptr(
                pairs, bitmask.data_ptr(), words * 4, len(matchers)
            )
        bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1
        return bits.view(len(matchers), -1)[:, : self.vocab_size].bool()
