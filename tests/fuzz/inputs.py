"""The fuzz targets' inputs: Hypothesis strategies that mutate real seeds byte by byte
(`mutated`) or as JSON (`json_mutated`: lone surrogates, NUL, NaN, huge numbers, deep nests put
where a value was), and libFuzzer's dictionary of JSON tokens (`json_dictionary`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

INTERESTING_U32 = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)
NOT_TEXT = ("\ud800", "\udfff", "\udc00\ud800", "\x00", "a\x00b", "\ufeff", "\U0010ffff")


@st.composite
def _mutated(draw: st.DrawFn, seeds: Sequence[bytes]) -> bytes:
    """A seed with a few byte-level edits: flips, overwrites, cuts, inserts, 32-bit fields."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        op = draw(st.sampled_from(("flip", "byte", "truncate", "delete", "insert", "u32")))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "u32":
            data[pos : pos + 4] = draw(st.sampled_from(INTERESTING_U32)).to_bytes(4, "little")
    return bytes(data)


def mutated(seeds: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    return _mutated(seeds)


TEXT = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=12),  # surrogates included
    st.sampled_from(NOT_TEXT),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from((0, 1, -1, 2**63, 2**64, 10**20, -(10**25), 10**300)),
    st.floats(),  # NaN and infinities too: json.dumps writes them as NaN / Infinity
    TEXT,
)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4)
)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*path, i))
    return out


def _replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy: Any = dict(value) if isinstance(value, dict) else list(value)
    copy[head] = _replaced(value[head], rest, new)
    return copy


@st.composite
def _json_mutated(draw: st.DrawFn, docs: Sequence[Any], keys: Sequence[str]) -> bytes:
    """A seed document with values swapped for arbitrary JSON (or extra keys added), encoded
    as JSON text that may hold NaN, CESU-8 surrogates or a deep nest."""
    doc = draw(st.sampled_from(docs))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        target = doc
        for step in path:
            target = target[step]
        if isinstance(target, dict) and draw(st.booleans()):
            key = draw(st.sampled_from(keys) | TEXT)
            doc = _replaced(doc, path, target | {key: draw(JSON_VALUES)})
        else:
            doc = _replaced(doc, path, draw(JSON_VALUES))
    if draw(st.integers(0, 9)) == 0:  # a deep nest where the chosen value was
        depth = draw(st.sampled_from((31, 32, 33, 1000, 50_000)))
        nest = "[" * depth + "]" * depth
        text = json.dumps(doc).replace("null", nest, 1)
    else:
        text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


def json_mutated(docs: Sequence[Any], keys: Sequence[str] = ()) -> st.SearchStrategy[bytes]:
    return _json_mutated(docs, keys)


def json_inputs(docs: Sequence[Any], keys: Sequence[str] = ()) -> st.SearchStrategy[bytes]:
    seeds = [json.dumps(d).encode() for d in docs]
    return st.one_of(json_mutated(docs, keys), mutated(seeds), st.binary(max_size=64))


JSON_TOKENS = (
    b"{",
    b"}",
    b"[",
    b"]",
    b'"',
    b":",
    b",",
    b"null",
    b"true",
    b"false",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e400",
    b"-0",
    b"99999999999999999999999",
    b"\\ud800",
    b"\\udc00",
    b"\\u0000",
    b"\\ud83d\\ude00",
    b"\xed\xa0\x80",
    b"\xc0\xaf",
    b"\xef\xbb\xbf",
)


def json_dictionary(keys: Sequence[str]) -> tuple[bytes, ...]:
    return JSON_TOKENS + tuple(json.dumps(k).encode() for k in keys)
