"""Build the model for a protection profile: the one factory the CLI (and later the API) calls.

`td-only` runs every block on the TD CPU. `split` runs the public prefix (embedding + blocks
``0..L-K-1``) on an untrusted device after verifying it against a pinned public reference, and
keeps the last K blocks, the final norm and the untied `lm_head` in TD memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from tdllm.errors import UsageError
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.loader import load_model
from tdllm.model.transformer import Transformer
from tdllm.trusted.crossing import DEVICE_KINDS, Crossing, available_devices
from tdllm.trusted.public_reference import PublicReference
from tdllm.trusted.split import OffloadedPrefix, offload_public_prefix, prefix_names

PROFILES = ("td-only", "split", "masked", "obfuscated")
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
    masked_base: str = "bundled"  # masked: the public base whose int8 weights the device holds
    masked_rank: int | None = None  # masked: rank of the TD's delta (None: kept exactly)
    obfuscation_eta: float = 1 / 16  # obfuscated: decoy share per head and per projection
    obfuscation_seed: int | None = None  # obfuscated: None draws the secrets from the OS CSPRNG

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
    if options.profile == "masked":  # loads MODEL itself, with masked projections
        return _build_masked(checkpoint, dtype, options)
    if options.profile == "split":
        checkpoint = _read_once(checkpoint, options.k)
    model, _ = load_model(checkpoint, dtype)
    if options.profile == "td-only":
        return model
    if options.profile == "obfuscated":
        return _build_obfuscated(model, options, max_batch, max_seq_len)
    k = options.k
    if not 1 <= k < model.cfg.num_layers:
        raise UsageError(f"--k must be in [1, {model.cfg.num_layers - 1}] for this model")
    if model.cfg.tie_word_embeddings:
        raise UsageError(
            "split needs an untied lm_head: a tied one is the public embedding table, so the "
            "model has no private head (untie it when preparing the private model)"
        )
    reference = PublicReference.load(options.public_reference or PINNED_REFERENCE)
    with _crossing_for(options) as crossing:
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
    return model


@contextmanager
def _crossing_for(options: ProtectionOptions) -> Iterator[Crossing]:
    """A fresh crossing to the profile's device, closed if building the model on it fails (on
    success the model owns it: `close_model`)."""
    crossing = Crossing.open(options.device, options.keep_payloads)
    try:
        yield crossing
    except BaseException:
        crossing.close()
        raise


def _build_masked(
    checkpoint: Checkpoint, dtype: torch.dtype, options: ProtectionOptions
) -> Transformer:
    from tdllm.model.sources import open_checkpoint
    from tdllm.protection.masked import build_masked

    base = open_checkpoint(options.masked_base)
    with _crossing_for(options) as crossing:
        model, _ = build_masked(checkpoint, base, dtype, crossing, options.masked_rank)
    return model


def _build_obfuscated(
    model: Transformer, options: ProtectionOptions, max_batch: int, max_seq_len: int
) -> Transformer:
    from tdllm.protection.obfuscated import obfuscate_model

    with _crossing_for(options) as crossing:
        obfuscate_model(
            model,
            crossing,
            max_batch,
            max_seq_len,
            options.obfuscation_eta,
            options.obfuscation_seed,
        )
    return model


def _read_once(checkpoint: Checkpoint, k: int) -> Checkpoint:
    """`checkpoint` streamed once for split: the first pass (the TD load) keeps the public
    prefix tensors, the second (the offload) hands them over and lets them go. A sealed
    checkpoint can only stream once, and no source is read twice."""
    names = set(prefix_names(checkpoint.config.num_layers - k))
    kept: dict[str, torch.Tensor] = {}
    passes = [0]

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        passes[0] += 1
        if passes[0] == 1:
            for name, tensor in checkpoint.tensors():
                if name in names:
                    kept[name] = tensor
                yield name, tensor
        else:
            while kept:
                yield kept.popitem()

    return dataclasses.replace(checkpoint, tensors=tensors, tensors_into=None)


def crossing_of(model: Transformer) -> Crossing | None:
    """The crossing a split or masked model talks through (None for td-only)."""
    obfuscation = getattr(model, "obfuscation", None)  # protection/obfuscated.py
    if obfuscation is not None:
        obfuscated: Crossing = obfuscation.crossing
        return obfuscated
    masked = getattr(model, "masked_method", None)
    if masked is not None:
        crossing: Crossing | None = masked.crossing
        return crossing
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
