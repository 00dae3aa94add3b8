"""The `UntrustedDevice` protocol and the in-process devices, `cpu` and `cuda`.

A device is handed public prefix weights once, then runs the prefix for token ids placed in its
own KV-cache slots, and returns hidden states. It keeps a `Transcript` of every tensor and
metadata item that crossed, and can `dump` everything it holds, for the A1 attack test.
`InProcessDevice` is one class for both in-process kinds; what only the GPU needs (availability,
synchronize, free the cache) it asks of `cuda_device.py`, the one module that touches
`torch.cuda`. The `process` device is `process_device.py`.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import torch

from tdllm.untrusted import cuda_device
from tdllm.untrusted.offload import OffloadStore
from tdllm.untrusted.prefix import PrefixShape, PublicPrefix
from tdllm.untrusted.transcript import Transcript

DEVICE_KINDS = ("cpu", "process", "cuda")
IN_PROCESS_KINDS = ("cpu", "cuda")  # `InProcessDevice`; "process" is `ProcessDevice`


class UntrustedDevice(Protocol):
    kind: str
    transcript: Transcript

    def load(self, shape: PrefixShape, weights: dict[str, torch.Tensor]) -> None:
        """Take the public prefix weights (checkpoint names) and allocate the KV cache."""
        ...

    def run_prefix(self, tokens: torch.Tensor, slots: list[int], starts: list[int]) -> torch.Tensor:
        """Hidden states ``[B, T, hidden]`` entering block `shape.num_layers`."""
        ...

    def gemm_io(self, names: list[str]) -> dict[str, torch.Tensor]:
        """``NAME:x``/``NAME:y`` of the last `run_prefix` for the projection weights `names`."""
        ...

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Keep `tensor` resident under `name`, for offloaded ops (`offload.py`)."""
        ...

    def call(
        self, op: str, args: dict[str, torch.Tensor], params: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Run the offloaded op `op` ("module.function") on resident tensors and `args`."""
        ...

    def dump(self) -> dict[str, torch.Tensor]:
        """Everything resident: prefix weights under checkpoint names, ``kv.*`` caches, and
        tensors `put` for offloaded ops."""
        ...

    def close(self) -> None: ...


class InProcessDevice:
    """The prefix in this process, on torch device `kind`: ``cpu`` (the reference device, used by
    tests and CI) or ``cuda`` (weights and KV cache on `cuda:0`).

    Whatever it holds lives in `kind` memory; hidden states, GEMM inputs/outputs and dumps come
    back to TD memory as CPU tensors (on ``cpu`` the very same tensors: no copy). GPU reductions
    are not bit-identical to the TD CPU's, so re-execution audits of a ``cuda`` device need a
    calibrated tolerance (trusted/device_rounding.py, measured on an H200: docs/security.md).
    """

    def __init__(self, kind: str = "cpu", keep_payloads: bool = False) -> None:
        if kind not in IN_PROCESS_KINDS:
            raise ValueError(f"no in-process device {kind!r}; choose one of {IN_PROCESS_KINDS}")
        if kind == "cuda" and not cuda_device.cuda_available():
            raise RuntimeError("no CUDA device is available")
        self.kind = kind
        self.transcript = Transcript(keep_payloads)
        self.prefix: PublicPrefix | None = None
        self.store = OffloadStore(kind)

    def load(self, shape: PrefixShape, weights: dict[str, torch.Tensor]) -> None:
        record_load(self.transcript, shape, weights)
        self.prefix = PublicPrefix(shape, weights, self.kind)
        if self.kind == "cuda":
            cuda_device.synchronize()

    def run_prefix(self, tokens: torch.Tensor, slots: list[int], starts: list[int]) -> torch.Tensor:
        record_step(self.transcript, tokens, slots, starts)
        hidden = self._loaded().run(tokens, slots, starts).to("cpu")
        self.transcript.tensor("from_device", "hidden", hidden)
        return hidden

    def gemm_io(self, names: list[str]) -> dict[str, torch.Tensor]:
        record_gemm_request(self.transcript, names)
        out = {n: t.to("cpu") for n, t in self._loaded().gemm_io_of(names).items()}
        for name, tensor in out.items():
            self.transcript.tensor("from_device", name, tensor)
        return out

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self.transcript.tensor("to_device", name, tensor)
        self.store.put(name, tensor)

    def call(
        self, op: str, args: dict[str, torch.Tensor], params: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        record_call(self.transcript, op, args, params)
        out = self.store.call(op, args, params)  # copies back to CPU memory: synchronous
        for name, tensor in out.items():
            self.transcript.tensor("from_device", name, tensor)
        return out

    def dump(self) -> dict[str, torch.Tensor]:
        held = self.store.held()
        if self.prefix is not None:
            held |= self.prefix.held_weights() | self.prefix.held_caches()
        return {name: t.to("cpu") for name, t in held.items()}

    def close(self) -> None:
        self.prefix = None
        self.store.clear()
        if self.kind == "cuda":
            cuda_device.empty_cache()

    def _loaded(self) -> PublicPrefix:
        if self.prefix is None:
            raise RuntimeError("the device holds no prefix: call load() first")
        return self.prefix


def record_load(
    transcript: Transcript, shape: PrefixShape, weights: dict[str, torch.Tensor]
) -> None:
    transcript.metadata("to_device", "shape", json.dumps(shape.to_json()).encode())
    for name, tensor in weights.items():
        transcript.tensor("to_device", name, tensor)


def record_step(
    transcript: Transcript, tokens: torch.Tensor, slots: list[int], starts: list[int]
) -> None:
    transcript.metadata(
        "to_device", "placement", json.dumps({"slots": slots, "starts": starts}).encode()
    )
    transcript.tensor("to_device", "tokens", tokens)


def record_gemm_request(transcript: Transcript, names: list[str]) -> None:
    transcript.metadata("to_device", "gemm_io", json.dumps(names).encode())


def record_call(
    transcript: Transcript, op: str, args: dict[str, torch.Tensor], params: dict[str, Any]
) -> None:
    transcript.metadata("to_device", "call", json.dumps({"op": op, "params": params}).encode())
    for name, tensor in args.items():
        transcript.tensor("to_device", name, tensor)


def open_device(kind: str, keep_payloads: bool = False) -> UntrustedDevice:
    """A fresh device of `kind` (one of `DEVICE_KINDS`)."""
    if kind in IN_PROCESS_KINDS:
        return InProcessDevice(kind, keep_payloads)
    if kind == "process":
        from tdllm.untrusted.process_device import ProcessDevice

        return ProcessDevice(keep_payloads)
    raise ValueError(f"unknown device {kind!r}; choose one of {', '.join(DEVICE_KINDS)}")


def available_kinds() -> list[str]:
    return ["cpu", "process"] + (["cuda"] if cuda_device.cuda_available() else [])
