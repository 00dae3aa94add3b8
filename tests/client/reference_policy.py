"""Reference-values policies for simulated TDs, as a model owner would publish them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tdllm_attest.abi import parse_quote
from tdllm_attest.policy_format import POLICY_SCHEMA, Policy, policy_from_document, sign_policy
from tdllm_attest.testing.platform import SimulatedTdxPlatform, SyntheticTdFields


def policy_document(
    platform: SimulatedTdxPlatform,
    fields: SyntheticTdFields | None = None,
    *,
    rtmr3: str = "zero",
    **changes: Any,
) -> dict[str, Any]:
    """The `tdllm-attest-policy/1` document that the TD with `fields` satisfies."""
    report = parse_quote(platform.quote(fields)).td_report
    document: dict[str, Any] = {
        "schema": POLICY_SCHEMA,
        "name": "simulated-test-td",
        "tcb": {"accepted_statuses": ["UpToDate"]},
        "xfam": [report.xfam.hex()],
        "measurements": [
            {
                "name": "test-release",
                "mr_td": report.mr_td.hex(),
                "rtmr0": report.rtmr[0].hex(),
                "rtmr1": report.rtmr[1].hex(),
                "rtmr2": report.rtmr[2].hex(),
            }
        ],
        "mr_config_id": report.mr_config_id.hex(),
        "mr_owner": report.mr_owner.hex(),
        "mr_owner_config": report.mr_owner_config.hex(),
        "rtmr3": rtmr3,
    }
    return document | changes


def policy_for(
    platform: SimulatedTdxPlatform, fields: SyntheticTdFields | None = None, **options: Any
) -> Policy:
    return policy_from_document(policy_document(platform, fields, **options))


def write_signed_policy(
    folder: Path, platform: SimulatedTdxPlatform, fields: SyntheticTdFields | None = None
) -> tuple[Path, Path]:
    """(policy file, public key PEM file) for the TD with `fields`, signed by a fresh key."""
    key = Ed25519PrivateKey.generate()
    policy_file, key_file = folder / "policy.json", folder / "policy-key.pub.pem"
    policy_file.write_text(sign_policy(policy_document(platform, fields), key), encoding="utf-8")
    public = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    key_file.write_bytes(public)
    return policy_file, key_file
