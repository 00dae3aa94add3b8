"""The GPU device: the public prefix in GPU memory. The only module that may touch `torch.cuda`."""

from __future__ import annotations

import torch

from tdllm.untrusted.device import (
    InProcessOffload,
    record_gemm_request,
    record_load,
    record_step,
)
from tdllm.untrusted.offload import OffloadStore
from tdllm.untrusted.prefix import PrefixShape, PublicPrefix
from tdllm.untrusted.transcript import Transcript


def cuda_available() -> bool:
    return bool(torch.cuda.is_available())


class CudaDevice(InProcessOffload):
    """Weights and KV cache on `cuda:0`; hidden states come back to TD memory as CPU tensors.

    GPU reductions are not bit-identical to the TD CPU's, so re-execution audits of this device
    need a calibrated tolerance (not yet calibrated: see docs/security.md).
    """

    kind = "cuda"

    def __init__(self, keep_payloads: bool = False) -> None:
        if not cuda_available():
            raise RuntimeError("no CUDA device is available")
        self.transcript = Transcript(keep_payloads)
        self.prefix: PublicPrefix | None = None
        self.store = OffloadStore("cuda")

    def load(self, shape: PrefixShape, weights: dict[str, torch.Tensor]) -> None:
        record_load(self.transcript, shape, weights)
        self.prefix = PublicPrefix(shape, weights, "cuda")
        torch.cuda.synchronize()

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

    def dump(self) -> dict[str, torch.Tensor]:
        held = self.store.held()
        if self.prefix is not None:
            held |= self.prefix.held_weights() | self.prefix.held_caches()
        return {name: t.to("cpu") for name, t in held.items()}

    def close(self) -> None:
        self.prefix = None
        self.store.clear()
        torch.cuda.empty_cache()

    def _loaded(self) -> PublicPrefix:
        if self.prefix is None:
            raise RuntimeError("the device holds no prefix: call load() first")
        return self.prefix
