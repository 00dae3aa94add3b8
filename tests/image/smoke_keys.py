"""The smoke image's UNSAFE key broker identity.

The smoke profile pins a broker public key in its measured config, and the smoke test runs the
broker on the host; an image may come prebuilt (TDLLM_SMOKE_IMAGE), so both sides derive the
key from a published seed instead of sharing a generated one. Anyone can sign as this broker:
never deploy the smoke image.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SMOKE_BROKER_SEED = b"tdllm UNSAFE smoke-image key broker (public seed: anyone can sign)"
# what the broker's record and the sealed manifest on the smoke test's models disk name
SMOKE_MODEL, SMOKE_MODEL_VERSION = "smoke-bundled", 1


def smoke_broker_key() -> Ed25519PrivateKey:
    """The UNSAFE signing key whose public half image/profiles/smoke.yml pins."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(SMOKE_BROKER_SEED).digest())
