"""Request bodies decoded strictly, before any field is read (docs/api.md, "Malformed input").

Bodies are decoded strictly (docs/api.md, "Malformed input"): UTF-8 only, so overlong forms,
truncated sequences and encoded surrogates are refused before JSON parsing; every string (keys
too) must be Unicode text without NUL, since a lone surrogate cannot be encoded for the tokenizer
and NUL is where C-string consumers of a prompt truncate; nesting is bounded (no OpenAI request
goes deeper than 5 levels, and Python's recursion limit must never be what stops a body);
numbers are finite and integers at most 20 digits (nothing here takes more than 64 bits, and
Python's int-string limit would otherwise decide); a key twice in one object is refused, so no
two parsers of one body can read different requests. The same rules apply to the request inside
an end-to-end envelope (`check_json`).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from tdllm.api.errors import invalid

MAX_JSON_DEPTH = 32  # the top-level object is level 1; OpenAI's deepest request needs 5
MAX_INT_DIGITS = 20  # 2**64 has 20 digits; no field takes more
_INT_LIMIT = 10**MAX_INT_DIGITS
_LONG_DIGITS = re.compile(f"[0-9]{{{MAX_INT_DIGITS + 1}}}")
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")  # NUL, and surrogates (text only in pairs)


def decode_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 (never a 500 for bad bytes)."""
    body = decode_json(raw)
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


def decode_json(raw: bytes) -> Any:
    """Strict UTF-8 JSON within the limits of `check_json`; an `ApiError` (400) otherwise."""
    try:
        # bytes to json.loads would be decoded with 'surrogatepass' and UTF-16/32 sniffed
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("the request body is not valid UTF-8") from None
    hooks: dict[str, Any] = {"object_pairs_hook": _object}
    if _LONG_DIGITS.search(text):  # maybe a long integer: length-check literals before int()
        hooks["parse_int"] = _integer
    try:
        value = json.loads(text, **hooks)
    except _DuplicateKeyError:
        raise invalid("the request body repeats a key in one object (duplicate key)") from None
    except RecursionError:  # far deeper than MAX_JSON_DEPTH: the parser gave up first
        raise invalid(_too_deep()) from None
    except ValueError:  # also the BOM of UTF-8, which RFC 8259 forbids senders to add
        raise invalid("the request body is not valid JSON") from None
    check_json(value)
    return value


def check_json(value: Any) -> None:
    """Refuse what `decode_json` refuses in an already parsed value (a 400 naming its path).

    Iterative, so that a value nested deeper than Python's recursion limit is refused too;
    scalars are checked inline and a path is built only for the error (bodies of a MiB).
    """
    if not isinstance(value, dict | list):
        _check_scalar(value, ())
        return
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if len(path) >= MAX_JSON_DEPTH:
            raise invalid(_too_deep(), _param(path[:1]))
        if isinstance(node, list) and all(type(item) is int for item in node):
            if node and not -_INT_LIMIT < min(node) <= max(node) < _INT_LIMIT:
                _check_scalar(next(i for i in node if abs(i) >= _INT_LIMIT), path)
            continue  # token ids: the common big list, checked at C speed
        for key, item in node.items() if isinstance(node, dict) else enumerate(node):
            if isinstance(key, str) and _NOT_TEXT.search(key):
                _check_scalar(key, path)  # a bad key: the path of its object
            if isinstance(item, dict | list):
                stack.append((item, (*path, key)))
            elif not (
                item is None
                or item is True
                or item is False
                or (type(item) is str and not _NOT_TEXT.search(item))
                or (type(item) is int and -_INT_LIMIT < item < _INT_LIMIT)
                or (type(item) is float and math.isfinite(item))
            ):
                _check_scalar(item, (*path, key))


def _check_scalar(item: Any, path: tuple[str | int, ...]) -> None:
    """A 400 naming `path` if `item` is a string, number or parser marker this API refuses."""
    where = _param(path)
    if isinstance(item, str):
        bad = _NOT_TEXT.search(item)
        if bad is None:
            return
        if bad.group() == "\x00":
            problem = "holds a NUL character (U+0000), which is refused"
        else:
            problem = "holds a lone surrogate (U+D800..U+DFFF), which is not Unicode text"
        raise invalid(f"{where or 'a key of the request'} {problem}", where)
    if isinstance(item, float) and not math.isfinite(item):
        raise invalid("numbers must be finite (no NaN or Infinity)", where)
    if isinstance(item, _TooLong) or (type(item) is int and abs(item) >= _INT_LIMIT):
        raise invalid(f"integers have at most {MAX_INT_DIGITS} digits", where)


class _DuplicateKeyError(Exception):
    """A key twice in one object (raised from inside json.loads)."""


class _TooLong:
    """An integer literal longer than MAX_INT_DIGITS: `check_json` refuses it with its path."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKeyError
    return obj


def _integer(literal: str) -> int | _TooLong:
    # checked before int(): its cost grows with the square of the digits, and whether Python's
    # own limit (4300 digits, configurable) applies is not this module's to decide
    if len(literal) - literal.startswith("-") > MAX_INT_DIGITS:
        return _TooLong()
    return int(literal)


def _param(path: tuple[str | int, ...]) -> str | None:
    """OpenAI's param form of a path: messages[0].content."""
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else f".{step}" if out else step
    return out or None


def _too_deep() -> str:
    return f"the request body nests more than {MAX_JSON_DEPTH} levels deep"
