"""Build the model for a protection profile: the one factory the CLI (and later the API) calls.

`td-only` runs every block on the TD CPU. `split` runs the public prefix (embedding + blocks
``0..L-K-1``) on an untrusted device after verifying it against a pinned public reference, and
keeps the last K blocks, the final norm and the untied `lm_head` in TD memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tdllm.errors import UsageError
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.loader import load_model
from tdllm.model.transformer import Transformer
from tdllm.trusted.crossing import DEVICE_KINDS, Crossing, available_devices
from tdllm.trusted.public_reference import PublicReference
from tdllm.trusted.split import OffloadedPrefix, offload_public_prefix

PROFILES = ("td-only", "split")
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
    keep_payloads: bool = False  # keep every crossing byte in the transcript (tests, attacks)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise UsageError(f"unknown profile {self.profile!r}; choose {', '.join(PROFILES)}")
        if self.device not in DEVICE_KINDS:
            raise UsageError(f"unknown device {self.device!r}; choose {', '.join(DEVICE_KINDS)}")


def build_model(
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    options: ProtectionOptions,
    max_batch: int,
    max_seq_len: int,
) -> Transformer:
    """A ready model; for `split`, its `prefix` is an audited `OffloadedPrefix`."""
    model, _ = load_model(checkpoint, dtype)
    if options.profile == "td-only":
        return model
    k = options.k
    if not 1 <= k < model.cfg.num_layers:
        raise UsageError(f"--k must be in [1, {model.cfg.num_layers - 1}] for this model")
    if model.cfg.tie_word_embeddings:
        raise UsageError(
            "split needs an untied lm_head: a tied one is the public embedding table, so the "
            "model has no private head (untie it when preparing the private model)"
        )
    reference = PublicReference.load(options.public_reference or PINNED_REFERENCE)
    crossing = Crossing.open(options.device, options.keep_payloads)
    try:
        offload_public_prefix(
            model,
            checkpoint,
            reference,
            crossing,
            k,
            max_batch,
            max_seq_len,
            options.audit_rate,
            options.freivalds_rate,
        )
    except BaseException:
        crossing.close()
        raise
    return model


def crossing_of(model: Transformer) -> Crossing | None:
    """The crossing a split model talks through (None for td-only)."""
    return model.prefix.crossing if isinstance(model.prefix, OffloadedPrefix) else None


def close_model(model: Transformer) -> None:
    crossing = crossing_of(model)
    if crossing is not None:
        crossing.close()


def describe() -> str:
    """One line for `tdllm doctor`."""
    return (
        f"profiles {', '.join(PROFILES)} (split K={DEFAULT_K} by default); "
        f"devices {', '.join(available_devices())}"
    )
