"""The tokenizer built from GGUF metadata, against transformers' own GGUF tokenizer."""

from __future__ import annotations

import pytest

from tdllm.model.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnew lines",
    "Confidential computing: naïve café, Größe, 東京, emoji ☕🙂",
    "<|im_start|>user\nhi<|im_end|>\n",
    "def f(x):\n    return x ** two  # code",
]


@pytest.fixture(scope="module")
def tok(bundled_checkpoint) -> Tokenizer:  # type: ignore[no-untyped-def]
    t: Tokenizer = bundled_checkpoint.tokenizer
    return t


@pytest.fixture(scope="module")
def hf_tok(bundled_checkpoint):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    path = bundled_checkpoint.path
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("text", TEXTS)
def test_encodes_like_transformers_gguf_tokenizer(tok: Tokenizer, hf_tok, text: str) -> None:  # type: ignore[no-untyped-def]
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.backend.decode(ids, skip_special_tokens=False) == text


def test_digits_are_split_one_by_one_as_smollm_was_trained(tok: Tokenizer) -> None:
    assert len(tok.encode("2025")) == 4


def test_chat_template_renders_roles_and_generation_prompt(tok: Tokenizer) -> None:
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # the template's default system prompt
    ids = tok.encode(text)
    assert ids.count(1) == 3  # <|im_start|> stays one special token


def test_end_of_turn_token_stops_generation(tok: Tokenizer) -> None:
    assert tok.encode("<|im_end|>")[0] in tok.stop_token_ids
