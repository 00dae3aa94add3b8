"""What a loaded model holds, for the peak-RSS target (issue 15: peak RSS <= 1.2x the weight
bytes plus the KV in use): every tensor of the model once (a tied head that shares the
embedding's storage counts once), the W8A8 projections' packed matrices and the bf16 weights
reordered for oneDNN, which are not tensors of the model (`w8a8_packed.packed_bytes`,
`PrepackedCpuMethod`)."""

from __future__ import annotations

from torch import nn

from tdllm.model import w8a8_packed

MIB = 1 << 20


def weight_bytes(model: nn.Module, skip_buffers: tuple[str, ...] = ()) -> int:
    """`skip_buffers`: name prefixes of buffers left out (`decode_profile` leaves out the rope
    tables, which a decode step reads one row of)."""
    storages = {}
    buffers = (b for name, b in model.named_buffers() if not name.startswith(skip_buffers))
    for tensor in (*model.parameters(), *buffers):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    packed = sum(
        w8a8_packed.packed_bytes(handle)
        for module in model.modules()
        if (handle := module.__dict__.get("w8a8_handle")) is not None
    )
    prepacked = sum(  # bf16 reordered for oneDNN (`PrepackedCpuMethod`): an opaque tensor
        weight.numel() * weight.element_size()
        for module in model.modules()
        if (weight := module.__dict__.get("packed_weight")) is not None
    )
    return sum(storages.values()) + packed + prepacked


def kv_bytes(token_bytes: int, sequences: int, tokens: int) -> int:
    """The KV cache's bytes at its fullest in a bench run: `sequences` of `tokens` each
    (the cache holds pages only where it was written: `tdllm.zero_pages`)."""
    return token_bytes * sequences * tokens
