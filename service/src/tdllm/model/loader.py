"""Build a `Transformer` for a checkpoint and stream its weights in; never return half a model."""

from __future__ import annotations

import torch

from tdllm.errors import ModelLoadError
from tdllm.freed_heap import return_freed_heap
from tdllm.model.checkpoint import Checkpoint, Destination, GgufTensors
from tdllm.model.linear import LinearMethodTable
from tdllm.model.transformer import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def load_model(
    checkpoint: Checkpoint,
    dtype: torch.dtype = torch.float32,
    methods: LinearMethodTable | None = None,
) -> tuple[Transformer, Checkpoint]:
    """`checkpoint` (`tdllm.sources.open_checkpoint` opens one by name or path) as a model."""
    if not isinstance(checkpoint, Checkpoint):
        raise TypeError("load_model takes a Checkpoint: open it with tdllm.sources.open_checkpoint")
    model = Transformer(checkpoint.config, methods, dtype)
    try:
        with torch.no_grad():
            if checkpoint.tensors_into is not None:
                model.load_weights(checkpoint.tensors_into(_destination_of(model)))
            elif isinstance(checkpoint.tensors, GgufTensors) and model.takes_blocks():
                # GGUF blocks straight into the methods that take them (int4, int8)
                model.load_weights(checkpoint.tensors.with_blocks())
            else:
                model.load_weights(checkpoint.tensors())
            model.after_load()
    except BaseException as exc:
        # A sealed checkpoint may fail on a later tensor after earlier ones were decrypted into
        # the model: scrub what got in, so no half-loaded plaintext model outlives the error.
        _zero(model)
        del model
        if isinstance(exc, ValueError):
            raise ModelLoadError(f"{checkpoint.path}: {exc}") from None
        raise
    if isinstance(checkpoint.tensors, GgufTensors):  # a tied head read the embedding again
        checkpoint.tensors.release_pages()
    return_freed_heap()  # the staging glibc would keep (freed_heap)
    return model.eval(), checkpoint


def _destination_of(model: Transformer) -> Destination:
    targets = model.weight_destinations()

    def destination(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        target = targets.get(name)
        if target is None or tuple(target.shape) != shape or target.dtype != dtype:
            return None  # e.g. an fp32 checkpoint loaded as bf16: the reader allocates, we cast
        return target if target.is_contiguous() else None

    return destination


def _zero(model: Transformer) -> None:
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.zero_()
