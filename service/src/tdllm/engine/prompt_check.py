"""The one check of a prompt's token ids: what the engine, the API and the CLI all refuse.

`check_prompt` owns the rules and their messages; each caller only maps the `PromptError` to its
own surface (the engine and the CLI raise it as the `UsageError` it is, the API turns its `code`
into a 400's param and code).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from tdllm.errors import UsageError

ProblemCode = Literal["empty", "context_length_exceeded", "token_out_of_range"]


class PromptError(UsageError):
    """A prompt that cannot run: a message for people and a machine `code`."""

    def __init__(self, message: str, code: ProblemCode) -> None:
        super().__init__(message)
        self.code: ProblemCode = code


def check_prompt(
    prompt: Sequence[int],
    *,
    vocab_size: int,
    context: int,
    max_prompt_tokens: int | None = None,
) -> None:
    """Raise `PromptError` unless `prompt` fits: non-empty, at most `max_prompt_tokens` long
    (when given), leaving room in `context` for at least one generated token, and every id in
    ``[0, vocab_size)``. The rules are checked in that order."""
    if not prompt:
        raise PromptError("the prompt is empty", "empty")
    n = len(prompt)
    if max_prompt_tokens is not None and n > max_prompt_tokens:
        raise PromptError(
            f"the prompt has {n} tokens; the limit is {max_prompt_tokens}",
            "context_length_exceeded",
        )
    if n >= context:
        raise PromptError(
            f"the prompt has {n} tokens; the context is {context} "
            "(prompt plus at least one generated token)",
            "context_length_exceeded",
        )
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise PromptError(f"token ids must be in [0, {vocab_size})", "token_out_of_range")
