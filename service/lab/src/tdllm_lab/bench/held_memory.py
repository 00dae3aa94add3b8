"""What a loaded model holds, for the peak-RSS target (issue 15: peak RSS <= 1.2x the weight
bytes plus the KV in use): every tensor of the model once (a tied head that shares the
embedding's storage counts once), the W8A8 projections' packed matrices and the bf16 weights
reordered for oneDNN, which are not tensors of the model (`w8a8_packed.packed_bytes`,
`PrepackedCpuMethod`)."""

from __future__ import annotations

from torch import nn

from tdllm.model import w8a8_packed

MIB = 1 << 20


def weight_bytes(
    model: nn.Module, skip_buffers: tuple[str, ...] = (), skip_modules: tuple[str, ...] = ()
) -> int:
    """`skip_buffers`: name prefixes of buffers left out (the rope tables); `skip_modules`: name
    prefixes of submodules whose own tensors are left out (storage another module shares is
    still counted once, through that module)."""
    storages = {}
    kept = {
        name: module
        for name, module in model.named_modules()
        if not (name and name.startswith(skip_modules))
    }
    for name, module in kept.items():
        prefix = f"{name}." if name else ""
        buffers = (
            b
            for own, b in module.named_buffers(recurse=False)
            if b is not None and not f"{prefix}{own}".startswith(skip_buffers)
        )
        for tensor in (*module.parameters(recurse=False), *buffers):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    packed = sum(
        w8a8_packed.packed_bytes(handle)
        for module in kept.values()
        if (handle := module.__dict__.get("w8a8_handle")) is not None
    )
    prepacked = sum(  # bf16 reordered for oneDNN (`PrepackedCpuMethod`): an opaque tensor
        weight.numel() * weight.element_size()
        for module in kept.values()
        if (weight := module.__dict__.get("packed_weight")) is not None
    )
    return sum(storages.values()) + packed + prepacked


def step_bytes(model: nn.Module) -> int:
    """The weight bytes a decode step reads: all `weight_bytes` counts but the rope tables and
    the embedding's own table (one row of each a token); a head that shares the embedding's
    storage, or that the embedding reads its rows from, is read whole and counted."""
    return weight_bytes(model, skip_buffers=("rope_",), skip_modules=("embed_tokens",))


def kv_bytes(token_bytes: int, sequences: int, tokens: int) -> int:
    """The KV cache's bytes at its fullest in a bench run: `sequences` of `tokens` each
    (the cache holds pages only where it was written: `tdllm.zero_pages`)."""
    return token_bytes * sequences * tokens
