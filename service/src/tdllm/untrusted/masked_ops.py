"""Device side of the `masked` profile: products of masked ring words with public int8 weights.

The TD puts each projection's int8 quantization of the PUBLIC base weight here (``[out, in]``,
deterministic from the public checkpoint, so publishing it publishes nothing) and then sends
one-time-padded activations ``x~`` (int32 words of Z_2^32, uniformly random to us). `gemm_ring`
returns the exact integer product ``x~ @ W.T`` over Z, as int64: the TD reduces it mod 2^32 to
unmask, and checks it over prime fields (Freivalds) first; the unreduced integer is something we
could compute ourselves from what we hold, so returning it reveals nothing more.

Exactness on a CPU (no fast int8 GEMM in stock torch): one float64 GEMM on the signed words.
|x~| <= 2^31 and |w| <= 127, so every partial sum is an integer below 2^38 * in; with in < 2^15
that is below 2^53, where float64 represents every integer and each addition is exact whatever
the summation order. Wider inputs are cut into column chunks under that bound and summed in
int64. A GPU would run the same contract as four u8 x s8 byte-plane GEMMs with int32
accumulation (protection.md section 6); the TD only sees the contract, not the method.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch

from tdllm.untrusted.offload import offload_op

# float64 is exact for integer sums below 2^53: 2^31 * 127 * chunk < 2^53 for chunk <= 2^15
EXACT_CHUNK = 1 << 15

# float64 copies of resident int8 weights, made once per resident tensor (this is the device's
# own memory; the int8 original is what was put, and what `dump` shows)
_wide: dict[int, tuple[weakref.ref[torch.Tensor], list[torch.Tensor]]] = {}


def _wide_chunks(weight: torch.Tensor) -> list[torch.Tensor]:
    entry = _wide.get(id(weight))
    if entry is not None and entry[0]() is weight:
        return entry[1]
    chunks = [
        weight[:, i : i + EXACT_CHUNK].to(torch.float64).T.contiguous()
        for i in range(0, weight.shape[1], EXACT_CHUNK)
    ]
    _wide[id(weight)] = (weakref.ref(weight), chunks)
    return chunks


@offload_op
def gemm_ring(
    resident: Mapping[str, torch.Tensor], args: dict[str, torch.Tensor], params: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """``y = x @ W.T`` over the integers for int32 words ``x[n, in]`` and resident int8 ``W``."""
    weight = resident[str(params["weight"])]
    x = args["x"]
    if weight.dtype != torch.int8 or x.dtype != torch.int32 or x.dim() != 2:
        raise ValueError("gemm_ring takes int32 words [n, in] and an int8 weight [out, in]")
    if x.shape[1] != weight.shape[1]:
        raise ValueError("gemm_ring: input width does not match the weight")
    total = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.int64, device=x.device)
    for i, chunk in enumerate(_wide_chunks(weight)):
        part = x[:, i * EXACT_CHUNK : (i + 1) * EXACT_CHUNK].to(torch.float64) @ chunk
        total += part.to(torch.int64)
    return {"y": total}
