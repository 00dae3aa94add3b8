"""Logprobs on the API: the model owner's one rule for both engines, and the answer's shapes.

Per-token log-probabilities help a client rebuild the model's last layers (Carlini et al.,
"Stealing Part of a Production Language Model", 2024; A15 in docs/security.md measures how much
faster they let an API user distil `split`'s private tail). So they are the model owner's
choice, `logprobs_policy` (settings): "off" (the default) refuses them, "top-k:N" allows up to
N alternatives per token. `check_logprobs` is that rule, for the vllm engine's relay and for
ours alike. Chat asks with ``logprobs: true`` and ``top_logprobs: N``; completions with
``logprobs: N``.

Our engine's logprobs are the raw model's (vLLM's default, `engine.sampling.LogprobTable`).
Chat answers carry OpenAI's ``{"content": [{token, logprob, bytes, top_logprobs}]}``;
completions the legacy ``{tokens, token_logprobs, top_logprobs, text_offset}``, whose
``top_logprobs`` also hold the chosen token (OpenAI's "up to logprobs + 1"). Tokens are
decoded one by one, as vLLM does; a stream's chunk carries the tokens generated since its
choice's last chunk (text held back for a stop string waits with its tokens).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from tdllm.api.errors import invalid
from tdllm.engine.sampling import TokenLogprobs
from tdllm.model.tokenizer import Tokenizer
from tdllm.settings import Settings, logprobs_limit

LOWEST = -9999.0  # what OpenAI and vLLM send for a log(0): JSON has no -Infinity


def check_logprobs(doc: dict[str, Any], limit: int | None) -> None:
    """Refuse logprobs beyond the model owner's `logprobs_policy` (None: off). A count that is
    not an integer is the parser's (or vLLM's) to refuse."""
    asked = doc.get("logprobs")
    top = doc.get("top_logprobs")
    # `is not`, never `in (None, False)`: completions' `logprobs: 0` asks (and 0 == False)
    wants = (asked is not None and asked is not False) or top is not None
    if not wants:
        return
    if limit is None:
        raise invalid(
            "logprobs are off on this service (its logprobs_policy): per-token probabilities "
            "help rebuild the model's last layers",
            "logprobs",
            "logprobs_refused",
        )
    count = top if top is not None else asked if not isinstance(asked, bool) else 0
    if isinstance(count, int) and not isinstance(count, bool) and count > limit:
        param = "top_logprobs" if top is not None else "logprobs"
        raise invalid(f"{param} is {count}; this service allows at most {limit}", param)


def check_policy(doc: dict[str, Any], settings: Settings) -> None:
    """`check_logprobs` under the service's `logprobs_policy`."""
    check_logprobs(doc, logprobs_limit(settings.logprobs_policy))


def requested(doc: dict[str, Any]) -> int | None:
    """The alternatives per token a checked body asks for; None: no logprobs."""
    asked = doc.get("logprobs")
    if asked is True:  # chat
        top = doc.get("top_logprobs")
        return top if isinstance(top, int) else 0
    if isinstance(asked, int) and not isinstance(asked, bool):  # completions
        return asked
    return None


def spelling(tokenizer: Tokenizer) -> Callable[[int], str]:
    """One token's text as logprobs spell it: decoded alone, special tokens included (vLLM)."""

    @functools.lru_cache(maxsize=4096)
    def spell(token: int) -> str:
        return tokenizer.decode([token], skip_special_tokens=False)

    return spell


def _logprob(value: float) -> float:
    return max(value, LOWEST)


def chat_content(entries: list[TokenLogprobs], text: Callable[[int], str]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: one item per token; `text` decodes one token id."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        spelled = text(token)
        return {"token": spelled, "logprob": _logprob(logprob), "bytes": list(spelled.encode())}

    return {
        "content": [
            item(e.token_id, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]}
            for e in entries
        ]
    }


def completion_logprobs(
    entries: list[TokenLogprobs], text: Callable[[int], str], offset: int = 0
) -> dict[str, Any]:
    """The legacy completions ``logprobs``; `offset`: where the first token's text starts in
    the choice's text (a stream's later chunks continue from the earlier ones)."""
    tokens = [text(e.token_id) for e in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [_logprob(e.logprob) for e in entries],
        "top_logprobs": [
            {text(t): _logprob(lp) for t, lp in ((e.token_id, e.logprob), *e.top)} for e in entries
        ],
        "text_offset": offsets,
    }


class ChoiceLogprobs:
    """Each choice's token logprobs as they come, handed out once (`take`) to the chunk or
    the whole answer that carries them; `offset` counts the characters of tokens taken."""

    def __init__(self, choices: int) -> None:
        self.pending: list[list[TokenLogprobs]] = [[] for _ in range(choices)]
        self.offset = [0] * choices

    def add(self, index: int, entry: TokenLogprobs) -> None:
        self.pending[index].append(entry)

    def take(self, index: int) -> list[TokenLogprobs]:
        taken, self.pending[index] = self.pending[index], []
        return taken

    def chat(self, index: int, text: Callable[[int], str]) -> dict[str, Any]:
        return chat_content(self.take(index), text)

    def completion(self, index: int, text: Callable[[int], str]) -> dict[str, Any]:
        shaped = completion_logprobs(self.take(index), text, self.offset[index])
        self.offset[index] += sum(len(t) for t in shaped["tokens"])
        return shaped
