"""Incremental detokenization with stop strings.

Text is released only when it is final: not in the middle of a UTF-8 character, and not a prefix
of a stop string that the next token might complete (a stop string never reaches the caller).

With `min_tokens`, as in vLLM (v1 detokenizer, vllm-project/vllm#22014), a stop string counts
only once more than `min_tokens` tokens are out, and only where it ends in the text of the tokens
after the first `min_tokens`; one wholly inside that text is ordinary text.
"""

from __future__ import annotations

from tdllm.model.tokenizer import Tokenizer


class TextStream:
    def __init__(
        self, tokenizer: Tokenizer, stop: tuple[str, ...] = (), min_tokens: int = 0
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.min_tokens = min_tokens
        self.floor = 0  # a stop string must end past this many characters (the first tokens')
        self.ids: list[int] = []
        self.released = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the newly final text (possibly empty). Sets `stopped`."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if self.stop and len(self.ids) == self.min_tokens:
            self.floor = len(text.rstrip("\ufffd"))
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            return ""
        hits: list[int] = []
        if len(self.ids) > self.min_tokens:
            starts = (text.find(s, max(0, self.floor - len(s) + 1)) for s in self.stop)
            hits = [i for i in starts if i >= 0]
        if hits:
            self.stopped = True
            return self._release(text[: min(hits)])
        hold = max((_overlap(text, s) for s in self.stop), default=0)
        return self._release(text[: len(text) - hold])

    def flush(self) -> str:
        """The text held back, at the end of generation for a reason other than a stop string."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(self.ids))

    def _release(self, final: str) -> str:
        if len(final) <= len(self.released):
            return ""
        delta = final[len(self.released) :]
        self.released = final
        return delta


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
