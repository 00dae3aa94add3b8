"""A GGUF load leaves none of the file's pages in the process's memory: each tensor's pages are
dropped once the model has taken it (and all of them after a tied head read the embedding
again), so a loaded model's RSS is its own layout, not that plus the file it came from (the 1B
shape in int8: 3.7 -> 2.4 GB, docs/performance.md)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tdllm.model.checkpoint import GgufTensors
from tdllm.model.gguf_blocks import GgufQuantized
from tdllm.model.loader import load_model
from tdllm.model.quantized import quant_table
from tdllm.sources import open_checkpoint
from tdllm_lab.bench.synthetic_shapes import Shape, ensure_gguf

# big enough that its tensors' pages dwarf the header's (tokenizer and metadata)
PAGES = Shape("pages", hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=4096, tied=True)


def mapped_rss_kib(path: Path) -> int:
    """This process's resident KiB of `path`'s mappings (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.endswith(" " + str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_a_gguf_load_leaves_none_of_the_files_pages_resident(tmp_path: Path, quant: str) -> None:
    path = ensure_gguf("pages", "q8_0", tmp_path, shape=PAGES, progress=False).resolve()
    checkpoint = open_checkpoint(str(path))
    tensors = checkpoint.tensors
    assert isinstance(tensors, GgufTensors)
    methods = quant_table(quant) if quant != "none" else None
    load_model(checkpoint, torch.float32, methods)
    header_kib = min(t.data_offset for t in tensors.tensors) // 1024
    data_kib = sum(t.n_bytes for t in tensors.tensors) // 1024
    assert data_kib > 4 * header_kib  # the check below can tell data pages from the header's
    assert mapped_rss_kib(path) <= header_kib + 8
    # the pages are only dropped, not lost: reading the tensors again brings them back in
    # (and shows this measure sees them)
    for t in tensors.tensors:
        np.asarray(t.data).view(np.uint8).sum()
    assert mapped_rss_kib(path) >= 0.9 * data_kib


def test_rows_a_consumer_has_taken_leave_memory_before_the_rest_of_the_tensor(
    tmp_path: Path,
) -> None:
    """The 8B head's staging read 0.5 GB of file pages that stayed until the whole tensor was
    in: each row range is let go once its copy exists (`GgufQuantized.taken`)."""
    path = ensure_gguf("pages", "q8_0", tmp_path, shape=PAGES, progress=False).resolve()
    tensors = open_checkpoint(str(path)).tensors
    assert isinstance(tensors, GgufTensors)
    name, table = next(tensors.with_blocks())
    assert name == "model.embed_tokens.weight" and isinstance(table, GgufQuantized)
    before = table.blocks.copy()  # touches every page of the tensor
    resident = mapped_rss_kib(path)
    half = table.rows // 2
    table.taken(0, half)
    dropped = resident - mapped_rss_kib(path)
    assert dropped >= 0.9 * table.blocks[:half].nbytes // 1024 - 8
    assert dropped <= table.blocks[:half].nbytes // 1024 + 8  # not the other half
    assert np.array_equal(table.blocks, before)  # dropped from memory, not lost: read again


def test_taking_rows_of_a_copy_leaves_the_copy_alone(tmp_path: Path) -> None:
    """``MADV_DONTNEED`` on our own memory would zero it: only views of the file's map are
    let go, whatever the blocks claim."""
    path = ensure_gguf("pages", "q8_0", tmp_path, shape=PAGES, progress=False).resolve()
    tensors = open_checkpoint(str(path)).tensors
    assert isinstance(tensors, GgufTensors)
    _, table = next(tensors.with_blocks())
    assert isinstance(table, GgufQuantized)
    own = np.array(table.blocks, copy=True)
    forged = GgufQuantized(table.kind, table.shape, own, tensors.release_view)
    forged.taken(0, table.rows)
    assert np.array_equal(own, table.blocks) and own.any()
