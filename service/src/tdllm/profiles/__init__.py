"""Protection profiles: how a served model is split between the TD and an untrusted device.

`build_model` (registry.py) turns a checkpoint and `ProtectionOptions` into a `ServedModel`;
base.py says what every profile answers; one module per profile.
"""

from tdllm.profiles.base import Profile, ServedModel
from tdllm.profiles.options import ProtectionOptions
from tdllm.profiles.registry import PROFILE_NAMES, build_model

__all__ = ["PROFILE_NAMES", "Profile", "ProtectionOptions", "ServedModel", "build_model"]
