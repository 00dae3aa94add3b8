"""Incremental detokenization: stop strings never reach the caller; text is released when final."""

from __future__ import annotations

import pytest

from tdllm.engine.stops import TextStream
from tdllm.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(bundled_checkpoint) -> Tokenizer:  # type: ignore[no-untyped-def]
    tok: Tokenizer = bundled_checkpoint.tokenizer
    return tok


def feed(tokenizer: Tokenizer, text: str, stop: tuple[str, ...]) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    deltas = []
    for token in tokenizer.encode(text):
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    return deltas, stream


def test_concatenated_deltas_equal_the_decoded_text(tokenizer: Tokenizer) -> None:
    text = "Confidential computing keeps weights sealed; naïve café ☕ 12345."
    deltas, stream = feed(tokenizer, text, ())
    assert "".join(deltas) + stream.flush() == text


def test_stop_string_truncates_and_is_never_emitted(tokenizer: Tokenizer) -> None:
    deltas, stream = feed(tokenizer, "alpha beta END gamma delta", ("END",))
    assert stream.stopped
    assert "".join(deltas) == "alpha beta "
    assert stream.flush() == ""


def test_text_that_may_start_a_stop_string_is_held_back(tokenizer: Tokenizer) -> None:
    stream = TextStream(tokenizer, ("###",))
    released = "".join(stream.push(t) for t in tokenizer.encode("x #"))
    assert released == "x "  # the "#" might begin "###"
    assert stream.flush() == "#"


def test_earliest_of_several_stop_strings_wins(tokenizer: Tokenizer) -> None:
    deltas, _ = feed(tokenizer, "one two three four", ("four", "two"))
    assert "".join(deltas) == "one "


def test_incomplete_utf8_character_is_not_released(tokenizer: Tokenizer) -> None:
    stream = TextStream(tokenizer)
    out = [stream.push(t) for t in tokenizer.encode("☕")]
    assert all("\ufffd" not in d for d in out)
    assert "".join(out) + stream.flush() == "☕"
