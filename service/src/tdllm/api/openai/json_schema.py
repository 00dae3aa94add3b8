"""The subset of JSON Schema (draft 2020-12) that the request tables use, checked in Python: the
same schemas the OpenAPI document publishes decide what the parsers accept."""

from __future__ import annotations

import functools
import math
import re
from typing import Any


def conforms(schema: dict[str, Any], value: Any) -> bool:
    """Whether a parsed JSON value is valid under `schema`, in the subset of JSON Schema (draft
    2020-12) that the request specs use; any other keyword is an error, never ignored. Stricter
    than JSON Schema in one way: an integer is an int, so 1.0 is not one (nor true a number)."""
    for keyword, arg in schema.items():
        if keyword == "description":
            continue
        if keyword == "additionalProperties":  # the one keyword that reads a sibling
            if not _additional(arg, value, schema.get("properties", {})):
                return False
            continue
        check = _KEYWORDS.get(keyword)
        if check is None:
            raise ValueError(f"conforms does not read the JSON Schema keyword {keyword!r}")
        if not check(arg, value):
            return False
    return True


_TYPES: dict[str, Any] = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: is_int(v),
    "number": lambda v: is_number(v),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


@functools.cache
def _pattern(pattern: str) -> re.Pattern[str]:
    """A JSON Schema (ECMA-262) pattern as a Python regex: unanchored, ``$`` the end of the text
    (Python's ``$`` also matches before a final newline). The request schemas' patterns use no
    other construct whose meaning differs."""
    return re.compile(pattern.replace("$", r"\Z"))


def _equal(a: Any, b: Any) -> bool:
    return bool(a == b) and isinstance(a, bool) == isinstance(b, bool)


def _properties(props: dict[str, Any], v: Any) -> bool:
    return not isinstance(v, dict) or all(conforms(props[k], v[k]) for k in props.keys() & v.keys())


def _additional(arg: Any, v: Any, props: dict[str, Any]) -> bool:
    if not isinstance(v, dict):
        return True
    extra = [v[k] for k in v if k not in props]
    return all(conforms(arg, x) for x in extra) if isinstance(arg, dict) else arg or not extra


_KEYWORDS: dict[str, Any] = {
    "type": lambda arg, v: _TYPES[arg](v),
    "const": lambda arg, v: _equal(v, arg),
    "enum": lambda arg, v: any(_equal(v, item) for item in arg),
    "anyOf": lambda arg, v: any(conforms(s, v) for s in arg),
    "minimum": lambda arg, v: not is_number(v) or v >= arg,
    "maximum": lambda arg, v: not is_number(v) or v <= arg,
    "exclusiveMinimum": lambda arg, v: not is_number(v) or v > arg,
    "minLength": lambda arg, v: not isinstance(v, str) or len(v) >= arg,
    "maxLength": lambda arg, v: not isinstance(v, str) or len(v) <= arg,
    "minItems": lambda arg, v: not isinstance(v, list) or len(v) >= arg,
    "maxItems": lambda arg, v: not isinstance(v, list) or len(v) <= arg,
    "items": lambda arg, v: not isinstance(v, list) or all(conforms(arg, x) for x in v),
    "maxProperties": lambda arg, v: not isinstance(v, dict) or len(v) <= arg,
    "propertyNames": lambda arg, v: not isinstance(v, dict) or all(conforms(arg, k) for k in v),
    "pattern": lambda arg, v: not isinstance(v, str) or _pattern(arg).search(v) is not None,
    "required": lambda arg, v: not isinstance(v, dict) or all(k in v for k in arg),
    "properties": _properties,
}


def is_int(value: Any) -> bool:
    """A JSON integer: an int, never a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite JSON number, never a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
