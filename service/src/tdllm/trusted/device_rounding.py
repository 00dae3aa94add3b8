"""How far an honest device's floating-point results may sit from the TD's, per device kind.

`split`'s two checks compare what the device computed with what the TD computes itself:
re-execution audits compare hidden states, Freivalds checks compare ``y @ s`` with ``x @ v``.
On the TD's own CPU kernels (`cpu`, and `process`, which runs the same kernels in another
process) an audit that replays the device's exact batch is bit-identical. A GPU sums in
another order (cuBLAS tiles, fused attention), so nothing it returns is bit-identical and every
comparison needs a tolerance; each one here was measured with `tdllm bench tolerance` on the
real model (docs/security.md, "Tolerances per device"), and is several times the largest honest
deviation seen, so an honest device is never stopped while a forgery of that size or above is.
What a tolerance lets through is in docs/security.md ("What `split` does NOT protect").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceRounding:
    exact_replay: bool  # an audit replaying the device's whole batch must match bit for bit
    audit_tolerance: dict[torch.dtype, float]  # |got - honest| / max|honest row|, per row
    freivalds_factor: float  # multiple of Freivalds' rounding bound (freivalds.py)

    def audit_tolerance_for(self, dtype: torch.dtype) -> float:
        try:
            return self.audit_tolerance[dtype]
        except KeyError:
            raise ValueError(f"no audit tolerance for {dtype} on this device") from None


_CPU = DeviceRounding(
    exact_replay=True,
    # rows recomputed in a smaller batch take other GEMM shapes: measured far below these
    audit_tolerance={torch.float32: 1e-4, torch.bfloat16: 1e-4},
    freivalds_factor=0.25,  # honest fp32 SmolLM2 products measured at <= 0.012
)

ROUNDING: dict[str, DeviceRounding] = {
    "cpu": _CPU,
    "process": _CPU,
    # NVIDIA H200, torch 2.11 + CUDA 13, the bundled model's stand-in, K=2, 8 prompts of 64+
    # tokens + 48 new, every step checked: honest audit deviations up to 2.3e-6 (fp32) and 0.022
    # (bf16), Freivalds up to 0.016 and 0.004 of the bound. A 2% forgery of one projection
    # moves an fp32 row by ~6e-4: caught in fp32, not by the bf16 audit (Freivalds catches it
    # there); docs/security.md, "Tolerances per device".
    "cuda": DeviceRounding(
        exact_replay=False,
        audit_tolerance={torch.float32: 2e-5, torch.bfloat16: 0.15},
        freivalds_factor=0.25,
    ),
}


def rounding_of(kind: str) -> DeviceRounding:
    try:
        return ROUNDING[kind]
    except KeyError:
        raise ValueError(f"no measured rounding for device {kind!r}") from None
