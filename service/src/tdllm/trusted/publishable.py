"""`Publishable`: the only kind of value `Crossing` sends to an untrusted device.

A tensor leaves the TD only as a `Publishable`, and only the constructors below make one, each
stating why its value may be published (`reason`):

- `public`: tensors whose sha256 matches the pinned public reference (split's prefix weights);
- `derived_from_public`: a deterministic function of such tensors (masked's int8 base weight);
- `one_time_padded`: fixed-point words plus fresh pads mod 2^32 (masked's activations);
- `token_ids`: split's prefix input (split does not hide prompts: docs/security.md A8);
- `obfuscated` / `plaintext_activation`: the obfuscated profile's transformed weights and the
  activations it sends as they are (it hides weights only, and not well: A2, A4, A6, A8).

Only `tdllm.trusted` imports this module (an import-linter contract), and the constructor refuses
a caller without the module's private mint, so code outside the TD's trusted zone cannot wrap a
tensor of its own choosing; `Crossing` refuses anything that is not a `Publishable`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from tdllm.trusted.pads import mask
from tdllm.trusted.public_reference import PublicReference

_MINT = object()  # held by this module only


class Publishable:
    """A tensor the TD has decided may leave, and why."""

    __slots__ = ("reason", "tensor")

    def __init__(self, tensor: torch.Tensor, reason: str, *, mint: object = None) -> None:
        if mint is not _MINT:
            raise TypeError("a Publishable is made only by tdllm.trusted.publishable")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"a Publishable holds a tensor, not {type(tensor).__name__}")
        self.tensor, self.reason = tensor, reason

    def __repr__(self) -> str:
        return f"Publishable({self.reason}, {tuple(self.tensor.shape)}, {self.tensor.dtype})"


def public(
    tensors: Mapping[str, torch.Tensor], reference: PublicReference
) -> dict[str, Publishable]:
    """Every tensor of `tensors`, once each matches `reference` (else `PublicPrefixMismatchError`
    listing every one that does not, and nothing is made)."""
    reference.verify(dict(tensors))
    return {n: Publishable(t, f"public ({reference.name})", mint=_MINT) for n, t in tensors.items()}


def derived_from_public(
    derive: Callable[[list[torch.Tensor]], torch.Tensor],
    sources: Mapping[str, torch.Tensor],
    reference: PublicReference,
) -> Publishable:
    """``derive(sources)`` once every source matches `reference`: a deterministic function of
    public tensors tells the device nothing it could not compute itself."""
    reference.verify(dict(sources))
    value = derive(list(sources.values()))
    return Publishable(value, f"derived from public ({reference.name})", mint=_MINT)


def one_time_padded(words: torch.Tensor, pads: torch.Tensor) -> Publishable:
    """``words + pads mod 2^32`` (int32): uniform on the ring when each pad row is fresh and
    uniform, which `pads.PadPool` guarantees (never handed out twice)."""
    if words.shape != pads.shape or pads.dtype != torch.int32:
        raise ValueError("one-time pads are int32 words of the activation's shape")
    return Publishable(mask(words, pads), "one-time padded", mint=_MINT)


def token_ids(tokens: torch.Tensor) -> Publishable:
    """Prompt and generated token ids for split's public prefix (which reads them by design)."""
    if tokens.is_floating_point() or tokens.is_complex():
        raise TypeError("token ids are integers")
    return Publishable(tokens, "token ids (split: the prefix reads the prompt)", mint=_MINT)


def obfuscated(tensor: torch.Tensor) -> Publishable:
    """A weight after the obfuscated profile's transforms (trusted/obfuscation.py)."""
    return Publishable(tensor, "obfuscated weight (seed 000; recoverable: A2/A4/A6)", mint=_MINT)


def plaintext_activation(x: torch.Tensor) -> Publishable:
    """An activation the obfuscated profile sends as it is: it hides weights only (A8)."""
    return Publishable(x, "plaintext activation (obfuscated hides no inputs)", mint=_MINT)
