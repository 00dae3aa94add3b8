"""What a data key unlocks: the owner's model name and its monotonic version.

The sealed manifest (MAC-covered), the broker's keystore record (in the wrap's AAD), the
broker's signed answer and the JWE header all carry the pair, and the TD refuses a key whose
pair is not its sealed manifest's. Versions only grow: a policy's `min_version` (broker) and
the image's `min_model_version` (TD) refuse older ones, which is how a rollback to an earlier,
flawed or more laxly sealed model is stopped. One definition of what a valid pair is, for both
distributions (the sealing code imports it too).
"""

from __future__ import annotations

MAX_MODEL_NAME_LENGTH = 200
MAX_MODEL_VERSION = 2**53 - 1  # exact in every JSON implementation


def valid_model_name(name: object) -> bool:
    """1..200 printable characters (the name appears in logs, JWE headers and reasons)."""
    return isinstance(name, str) and 0 < len(name) <= MAX_MODEL_NAME_LENGTH and name.isprintable()


def valid_model_version(version: object) -> bool:
    """An integer from 1 to 2**53 - 1 (never a bool)."""
    return type(version) is int and 1 <= version <= MAX_MODEL_VERSION
