"""What a loaded model holds (the bench's peak-RSS target divides by it) and the heap handed
back after a load (`tdllm.freed_heap`)."""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import sys

import pytest
import torch

from tdllm.model import w8a8_packed
from tdllm.model.linear import Linear, LinearMethodTable, PrepackedCpuMethod, can_prepack_bf16
from tdllm.model.quantized import quant_table
from tdllm.model.transformer import Transformer
from tdllm_lab.bench.held_memory import step_bytes, weight_bytes
from tests.cpu_kernels import needs_vnni
from tests.tiny_model import TINY, tiny_model, tiny_tensors


def test_every_weight_counts_once_and_a_tied_head_shares_the_embeddings_bytes() -> None:
    untied = tiny_model()
    floats = sum(t.numel() for t in tiny_tensors().values()) * 4
    buffers = sum(b.untyped_storage().nbytes() for b in untied.buffers())
    assert weight_bytes(untied) == floats + buffers
    tied = tiny_model(dataclasses.replace(TINY, tie_word_embeddings=True))
    assert weight_bytes(tied) == weight_bytes(untied) - TINY.vocab_size * TINY.hidden_size * 4


def test_a_decode_step_reads_all_but_the_embeddings_table_and_the_rope_tables() -> None:
    """A step reads one row of the embedding and of the rope tables; a tied head reads the
    table it shares with the embedding whole, so there it counts."""
    rope = sum(
        b.untyped_storage().nbytes() for n, b in tiny_model().named_buffers() if "rope_" in n
    )
    table = TINY.vocab_size * TINY.hidden_size * 4
    untied = tiny_model()
    assert rope > 0 and step_bytes(untied) == weight_bytes(untied) - table - rope
    tied = tiny_model(dataclasses.replace(TINY, tie_word_embeddings=True))
    assert step_bytes(tied) == weight_bytes(tied) - rope


@pytest.mark.skipif(not can_prepack_bf16(), reason="no native bf16: nothing is reordered")
def test_bf16_weights_reordered_for_onednn_count_as_the_plain_ones_did() -> None:
    plain = Transformer(TINY, LinearMethodTable(default=PrepackedCpuMethod(prepack=False)),
                        torch.bfloat16)  # fmt: skip
    plain.load_weights(tiny_tensors().items())
    plain.after_load()
    prepacked = Transformer(TINY, LinearMethodTable(default=PrepackedCpuMethod(prepack=True)),
                            torch.bfloat16)  # fmt: skip
    prepacked.load_weights(tiny_tensors().items())
    prepacked.after_load()
    assert any("packed_weight" in vars(m) for m in prepacked.modules())
    assert weight_bytes(prepacked) >= weight_bytes(plain)


@needs_vnni
def test_w8a8_counts_its_packed_matrices_which_are_no_tensors_of_the_model() -> None:
    model = tiny_model(methods=quant_table("w8a8"))
    packed = [m for m in model.modules() if isinstance(m, Linear) and "w8a8_handle" in vars(m)]
    assert packed
    tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in (*model.parameters(), *model.buffers())}  # fmt: skip
    int8 = sum(m.out_features * m.in_features for m in packed)
    assert weight_bytes(model) >= sum(tensors.values()) + int8


@needs_vnni
def test_a_packed_projection_is_forgotten_with_its_layer() -> None:
    model = tiny_model(methods=quant_table("w8a8"))
    handles = [vars(m)["w8a8_handle"] for m in model.modules() if "w8a8_handle" in vars(m)]
    assert all(w8a8_packed.packed_bytes(h) > 0 for h in handles)
    del model
    import gc

    gc.collect()
    for h in handles:
        with pytest.raises(KeyError):
            w8a8_packed.packed_bytes(h)


HEAP_KEPT = """
import torch
from tdllm.freed_heap import return_freed_heap
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) >> 10
big = torch.ones(30 << 20, dtype=torch.uint8); del big  # glibc's mmap threshold -> 30 MiB
base = rss()
blocks = [torch.ones(12 << 20, dtype=torch.uint8) for _ in range(4)]  # now heap, not mmap
del blocks
kept = rss() - base
return_freed_heap()
print(kept, rss() - base)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's heap, glibc's trim")
def test_freed_heap_is_handed_back_to_the_kernel() -> None:
    """Positive control first: glibc keeps the 48 MiB of freed blocks (its trim threshold
    follows the mmap threshold up), and only the trim hands them back."""
    out = subprocess.run([sys.executable, "-c", HEAP_KEPT], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    kept, after = map(int, out.split())
    assert kept >= 40 and after <= 8, (kept, after)
