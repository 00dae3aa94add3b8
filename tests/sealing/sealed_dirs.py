"""Read and rewrite parts of a sealed directory the way an attacker with disk access could."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tdllm.sealing.format import CHUNK_OVERHEAD, MANIFEST_NAME
from tdllm_attest.wire import canonical_json


def document(folder: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((folder / MANIFEST_NAME).read_text())
    return loaded


def write_document(folder: Path, doc: dict[str, Any]) -> None:
    (folder / MANIFEST_NAME).write_bytes(canonical_json(doc))


def entry(folder: Path, name: str) -> dict[str, Any]:
    rows = document(folder)["manifest"]["tensors"]
    return next(r for r in rows if r["name"] == name)


def chunk_span(folder: Path, name: str, index: int) -> tuple[Path, int, int]:
    """(data file, offset, length) of stored chunk `index` of tensor `name` (a full chunk)."""
    row = entry(folder, name)
    size = document(folder)["manifest"]["chunk_size"] + CHUNK_OVERHEAD
    assert index < row["chunks"] - 1, "only full chunks have a fixed size"
    return folder / row["file"], row["offset"] + index * size, size


def read_chunk(folder: Path, name: str, index: int) -> bytes:
    path, offset, length = chunk_span(folder, name, index)
    return path.read_bytes()[offset : offset + length]


def write_chunk(folder: Path, name: str, index: int, data: bytes) -> None:
    path, offset, length = chunk_span(folder, name, index)
    assert len(data) == length
    raw = bytearray(path.read_bytes())
    raw[offset : offset + length] = data
    path.write_bytes(raw)


def all_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


@contextmanager
def xored(path: Path, offset: int, mask: int) -> Iterator[None]:
    """XOR one byte of `path` with `mask` for the duration of the block, then restore it."""
    with open(path, "r+b") as f:
        f.seek(offset)
        original = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([original ^ mask]))
    try:
        yield
    finally:
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(bytes([original]))
