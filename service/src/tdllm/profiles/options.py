"""What a caller asks of a protection profile (CLI flags, service settings), checked early."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tdllm.errors import UsageError
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.quant_formats import QUANTS
from tdllm.trusted.crossing import DEVICE_KINDS
from tdllm.trusted.device_rounding import DeviceRounding

DEFAULT_K = 2
DEFAULT_AUDIT_RATE = 0.01
DEFAULT_FREIVALDS_RATE = 0.01  # per step; see docs/security.md for what it catches and costs
# The only public base shipped: per-tensor sha256 of the bundled SmolLM2-135M-Instruct (fp32).
PINNED_REFERENCE = Path(__file__).with_name("references") / "SmolLM2-135M-Instruct.json"


@dataclass(frozen=True)
class ProtectionOptions:
    profile: str = "td-only"
    device: str = "cpu"
    k: int = DEFAULT_K
    public_reference: Path | None = None  # None: the pinned bundled base
    audit_rate: float = DEFAULT_AUDIT_RATE
    freivalds_rate: float = DEFAULT_FREIVALDS_RATE
    # split's audit and Freivalds tolerances; None: the device kind's measured ones
    # (device_rounding.py; `tdllm bench tolerance` measures with unbounded ones)
    rounding: DeviceRounding | None = None
    keep_payloads: bool = False  # keep every crossing byte in the transcript (tests, attacks)
    # masked: the public base whose int8 weights the device holds (a name, or an open checkpoint)
    masked_base: str | Checkpoint = "bundled"
    masked_rank: int | None = None  # masked: rank of the TD's delta (None: kept exactly)
    obfuscation_eta: float = 1 / 16  # obfuscated: decoy share per head and per projection
    obfuscation_seed: int | None = None  # obfuscated: None draws the secrets from the OS CSPRNG
    # quantization at load, "none" | "int8" | "int4" | "w8a8" | "w8a8-onednn" | "w8a8-avx512"
    # | "w8a8-avx2" | "w4a8" | "w4a8-avx512"
    # (tdllm.model.quantized): td-only's every projection; split's private tail and lm_head
    # (its public prefix stays as it is); masked's TD-held delta and lm_head (the device's
    # public int8 product is the scheme's own)
    quant: str = "none"

    def __post_init__(self) -> None:
        # the profile's name is checked against the registry (`profile_class`)
        if self.device not in DEVICE_KINDS:
            raise UsageError(f"unknown device {self.device!r}; choose {', '.join(DEVICE_KINDS)}")
        if self.quant not in QUANTS:
            raise UsageError(f"unknown quant {self.quant!r}; choose {', '.join(QUANTS)}")
        if self.quant != "none" and self.profile == "obfuscated":
            raise UsageError(
                f"quant {self.quant!r} runs with profile 'td-only', 'split' or 'masked' "
                "('obfuscated' runs every projection on the device: the TD multiplies by no "
                "weight of its own)"
            )
