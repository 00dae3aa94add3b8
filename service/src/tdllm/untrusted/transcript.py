"""A record of everything that crossed to or from an untrusted device, for audits and attacks.

Every device keeps one. Each record names the tensor or metadata item, its direction, shape,
dtype and size in bytes; with `keep_payloads` the bytes themselves are kept too, so the A1 test
can search them for private weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Direction = Literal["to_device", "from_device"]


@dataclass(frozen=True)
class CrossingRecord:
    direction: Direction
    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    payload: bytes | None = None


@dataclass
class Transcript:
    keep_payloads: bool = False
    records: list[CrossingRecord] = field(default_factory=list)

    def tensor(self, direction: Direction, name: str, tensor: torch.Tensor) -> None:
        data = tensor_bytes(tensor) if self.keep_payloads else None
        nbytes = tensor.numel() * tensor.element_size()
        record = CrossingRecord(
            direction, name, tuple(tensor.shape), str(tensor.dtype), nbytes, data
        )
        self.records.append(record)

    def metadata(self, direction: Direction, name: str, encoded: bytes) -> None:
        payload = encoded if self.keep_payloads else None
        self.records.append(
            CrossingRecord(direction, name, (len(encoded),), "bytes", len(encoded), payload)
        )

    def bytes_crossed(self, direction: Direction | None = None) -> int:
        return sum(r.nbytes for r in self.records if direction in (None, r.direction))

    def names(self, direction: Direction | None = None) -> list[str]:
        return [r.name for r in self.records if direction in (None, r.direction)]


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's raw little-endian bytes (works for bf16, which numpy cannot hold)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes())
