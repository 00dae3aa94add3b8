"""Per-tensor SHA-256 of a public checkpoint: what may be sent to an untrusted device.

Hashes are taken over the tensor's fp32 little-endian bytes, so a GGUF-dequantized checkpoint
and its fp32 export hash alike, and the TD can verify a tensor before anything is sent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tdllm.trusted.errors import PublicPrefixMismatchError

FORMAT = "tdllm-public-reference/1"


def tensor_sha256(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


@dataclass
class PublicReference:
    """Checkpoint tensor name -> sha256 hex (plus shape), for one pinned public checkpoint."""

    name: str
    hashes: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def build(cls, name: str, tensors: Iterable[tuple[str, torch.Tensor]]) -> PublicReference:
        ref = cls(name)
        for tensor_name, tensor in tensors:
            ref.hashes[tensor_name] = tensor_sha256(tensor)
            ref.shapes[tensor_name] = list(tensor.shape)
        return ref

    def restricted_to(self, names: Iterable[str]) -> PublicReference:
        keep = set(names)
        return PublicReference(
            self.name,
            {n: h for n, h in self.hashes.items() if n in keep},
            {n: s for n, s in self.shapes.items() if n in keep},
        )

    def save(self, path: Path) -> None:
        body = {"format": FORMAT, "name": self.name, "dtype_hashed": "float32"}
        body["tensors"] = {  # type: ignore[assignment]
            n: {"sha256": self.hashes[n], "shape": self.shapes[n]} for n in sorted(self.hashes)
        }
        path.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> PublicReference:
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PublicPrefixMismatchError(f"cannot read public reference {path}: {exc}") from None
        if body.get("format") != FORMAT:
            raise PublicPrefixMismatchError(f"{path} is not a {FORMAT} file")
        tensors = body["tensors"]
        return cls(
            str(body["name"]),
            {n: str(t["sha256"]) for n, t in tensors.items()},
            {n: list(t["shape"]) for n, t in tensors.items()},
        )

    def mismatches(self, name: str, tensor: torch.Tensor) -> str | None:
        """Why `tensor` is not the pinned public `name`, or None when it is."""
        if name not in self.hashes:
            return "not in the public reference"
        if list(tensor.shape) != self.shapes[name]:
            return f"shape {list(tensor.shape)} != public {self.shapes[name]}"
        if tensor_sha256(tensor) != self.hashes[name]:
            return "differs from the public checkpoint (sha256)"
        return None

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether some public tensor, under any name, has exactly `tensor`'s values: such bytes
        are no secret even inside a private model (an untied head kept as the embedding)."""
        return tensor_sha256(tensor) in self.hashes.values()

    def verify(self, tensors: dict[str, torch.Tensor]) -> None:
        """Raise `PublicPrefixMismatchError` listing every tensor that is not public."""
        bad = {n: why for n, t in tensors.items() if (why := self.mismatches(n, t))}
        if bad:
            lines = "; ".join(f"{n}: {why}" for n, why in sorted(bad.items())[:8])
            raise PublicPrefixMismatchError(
                f"{len(bad)} of {len(tensors)} tensors are not the public checkpoint "
                f"{self.name} ({lines}); refusing to send them to an untrusted device"
            )
