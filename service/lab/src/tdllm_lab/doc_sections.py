"""Generated sections of the docs: the text between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->``, rewritten by the command that measured it (never edited by hand)."""

from __future__ import annotations

import re
from pathlib import Path

from tdllm.errors import UsageError


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def _pattern(name: str) -> re.Pattern[str]:
    begin, end = markers(name)
    return re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)


def read_marked(path: Path, name: str) -> str:
    """`path`'s text, which must hold section `name` (checked before any measuring)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not _pattern(name).search(text):
        begin, end = markers(name)
        raise UsageError(f"{path} has no {begin} ... {end} markers")
    return text


def replace_marked(path: Path, name: str, body: str) -> None:
    """Replace section `name` of `path` with `body` (the markers are kept around it)."""
    text = read_marked(path, name)
    begin, end = markers(name)
    section = f"{begin}\n{body.strip()}\n{end}"
    path.write_text(_pattern(name).sub(lambda _: section, text, count=1), encoding="utf-8")
