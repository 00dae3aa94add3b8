"""The protection profiles by name, and `build_model`: the one factory the CLI and the service
call. A fifth profile is one new module beside these and one line in `PROFILES`."""

from __future__ import annotations

import torch

from tdllm.errors import UsageError
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.loader import load_model
from tdllm.profiles.base import ProfileBase, ServedModel
from tdllm.profiles.masked import Masked
from tdllm.profiles.obfuscated import Obfuscated
from tdllm.profiles.options import DEFAULT_K, ProtectionOptions
from tdllm.profiles.split import Split
from tdllm.profiles.td_only import TdOnly
from tdllm.trusted.crossing import Crossing, available_devices

PROFILES: dict[str, type[ProfileBase]] = {p.name: p for p in (TdOnly, Split, Masked, Obfuscated)}
PROFILE_NAMES = tuple(PROFILES)


def build_model(
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    options: ProtectionOptions,
    max_batch: int,
    max_seq_len: int,
) -> ServedModel:
    """A model ready to serve under `options.profile`; `ServedModel.close` releases it. If
    building fails, the crossing opened for it is closed before the error propagates."""
    kind = profile_class(options.profile)
    crossing = Crossing.open(options.device, options.keep_payloads) if kind.uses_device else None
    try:
        profile = kind(options, crossing, max_batch, max_seq_len)
        source = profile.source(checkpoint)
        model, _ = load_model(source, dtype, profile.linear_methods(source.config))
        profile.after_load(model, source)
        model.place(profile.prefix_placement(), profile.attention_core)
    except BaseException:
        if crossing is not None:
            crossing.close()
        raise
    return ServedModel(model, profile, crossing)


def profile_class(name: str) -> type[ProfileBase]:
    try:
        return PROFILES[name]
    except KeyError:
        raise UsageError(f"unknown profile {name!r}; choose {', '.join(PROFILE_NAMES)}") from None


def check_options(profile: str, device: str, quant: str = "none") -> None:
    """Raise `UsageError` for an unknown profile, device or quant, or a quant the profile does
    not take (settings check them at load)."""
    profile_class(profile)
    ProtectionOptions(profile, device, quant=quant)


def describe() -> str:
    """One line for `tdllm doctor`."""
    return (
        f"profiles {', '.join(PROFILE_NAMES)} (split K={DEFAULT_K} by default); "
        f"devices {', '.join(available_devices())}"
    )
