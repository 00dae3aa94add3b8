"""The `UntrustedDevice` protocol and the in-process `cpu` device.

A device is handed public prefix weights once, then runs the prefix for token ids placed in its
own KV-cache slots, and returns hidden states. It keeps a `Transcript` of every tensor and
metadata item that crossed, and can `dump` everything it holds, for the A1 attack test.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import torch

from tdllm.untrusted.offload import OffloadStore
from tdllm.untrusted.prefix import PrefixShape, PublicPrefix
from tdllm.untrusted.transcript import Transcript

DEVICE_KINDS = ("cpu", "process", "cuda")


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


class InProcessOffload:
    """`put`/`call` for a device whose `OffloadStore` lives in this process (cpu, cuda)."""

    transcript: Transcript
    store: OffloadStore

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


class CpuDevice(InProcessOffload):
    """The prefix in this process, on the CPU: the reference device, used by tests and CI."""

    kind = "cpu"

    def __init__(self, keep_payloads: bool = False) -> None:
        self.transcript = Transcript(keep_payloads)
        self.prefix: PublicPrefix | None = None
        self.store = OffloadStore("cpu")

    def load(self, shape: PrefixShape, weights: dict[str, torch.Tensor]) -> None:
        record_load(self.transcript, shape, weights)
        self.prefix = PublicPrefix(shape, weights, "cpu")

    def run_prefix(self, tokens: torch.Tensor, slots: list[int], starts: list[int]) -> torch.Tensor:
        record_step(self.transcript, tokens, slots, starts)
        hidden = self._loaded().run(tokens, slots, starts)
        self.transcript.tensor("from_device", "hidden", hidden)
        return hidden

    def gemm_io(self, names: list[str]) -> dict[str, torch.Tensor]:
        record_gemm_request(self.transcript, names)
        out = self._loaded().gemm_io_of(names)
        for name, tensor in out.items():
            self.transcript.tensor("from_device", name, tensor)
        return out

    def dump(self) -> dict[str, torch.Tensor]:
        held = self.store.held()
        if self.prefix is not None:
            held |= self.prefix.held_weights() | self.prefix.held_caches()
        return held

    def close(self) -> None:
        self.prefix = None
        self.store.clear()

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
    if kind == "cpu":
        return CpuDevice(keep_payloads)
    if kind == "process":
        from tdllm.untrusted.process_device import ProcessDevice

        return ProcessDevice(keep_payloads)
    if kind == "cuda":
        from tdllm.untrusted.cuda_device import CudaDevice

        return CudaDevice(keep_payloads)
    raise ValueError(f"unknown device {kind!r}; choose one of {', '.join(DEVICE_KINDS)}")


def available_kinds() -> list[str]:
    from tdllm.untrusted.cuda_device import cuda_available

    return ["cpu", "process"] + (["cuda"] if cuda_available() else [])
