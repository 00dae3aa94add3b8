"""Reference values: signed in the attestation policy's envelope, checked, turned into a policy."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tdllm_attest.errors import PolicyDocumentError
from tdllm_attest.policy_format import load_policy
from tests.image.conftest import IMAGE_DIR

ROOT_HASH = "ab" * 32


@pytest.fixture
def artefacts(tmp_path: Path) -> Path:
    out = tmp_path / "smoke"
    out.mkdir()
    for name in ("uki.efi", "vmlinuz", "initrd.img", "root.img", "packages.txt"):
        (out / name).write_bytes(f"{name} bytes".encode())
    (out / "python-packages.txt").write_text("tdllm==0.1.0\n")
    (out / "cmdline.txt").write_text(
        f"ro root=/dev/mapper/vroot tdllm.verity=/dev/vda,8,32768,{ROOT_HASH}"
    )
    return out


def document(refvalues: ModuleType, artefacts: Path) -> dict:  # type: ignore[type-arg]
    return refvalues.build_document(
        artefacts,
        profile="smoke",
        verity_root_hash=ROOT_HASH,
        verity_salt="00" * 32,
        source_date_epoch=1735689600,
        commit="0" * 40,
        dirty=False,
    )


def golden_for(doc: dict) -> dict:  # type: ignore[type-arg]
    return {
        "shape": "16 vCPU / 64 GiB / 1 H100",
        "uki_sha384": doc["artefacts"]["uki.efi"]["sha384"],
        "mr_td": "11" * 48,
        "rtmr0": "22" * 48,
        "rtmr1": "33" * 48,
        "rtmr2": "44" * 48,
        "xfam": "e702060000000000",
    }


def test_document_holds_sha384_of_every_artefact_and_the_cmdline(
    refvalues: ModuleType, artefacts: Path
) -> None:
    doc = document(refvalues, artefacts)
    assert doc["artefacts"]["uki.efi"]["sha384"] == hashlib.sha384(b"uki.efi bytes").hexdigest()
    assert set(doc["artefacts"]) == {"uki.efi", "vmlinuz", "initrd.img", "root.img"}
    cmdline = (artefacts / "cmdline.txt").read_bytes()
    assert doc["cmdline_sha384"] == hashlib.sha384(cmdline).hexdigest()
    assert doc["verity"]["root_hash"] == ROOT_HASH
    assert set(doc["manifests"]) == {"packages.txt", "python-packages.txt"}


def test_rejects_a_cmdline_without_the_verity_root_hash(
    refvalues: ModuleType, artefacts: Path
) -> None:
    (artefacts / "cmdline.txt").write_text("ro root=/dev/vda")
    with pytest.raises(refvalues.RefValuesError, match="root hash"):
        document(refvalues, artefacts)


def test_signature_is_the_one_load_policy_checks(refvalues: ModuleType, artefacts: Path) -> None:
    key = Ed25519PrivateKey.generate()
    text = refvalues.sign_document(document(refvalues, artefacts), key)
    # The signature verifies in tdllm_attest.policy; only the schema check (artefacts, not
    # registers) keeps it from being used as a policy.
    with pytest.raises(PolicyDocumentError, match="unknown key"):
        load_policy(text, key.public_key())
    tampered = text.replace('"profile": "smoke"', '"profile": "prod"')
    with pytest.raises(PolicyDocumentError, match="signature does not verify"):
        load_policy(tampered, key.public_key())


def test_verify_rejects_a_changed_digest_and_a_foreign_key(
    refvalues: ModuleType, artefacts: Path
) -> None:
    key = Ed25519PrivateKey.generate()
    doc = document(refvalues, artefacts)
    text = refvalues.sign_document(doc, key)
    assert refvalues.verify_document(text, key.public_key()) == doc
    envelope = json.loads(text)
    envelope["policy"]["artefacts"]["root.img"]["sha384"] = "00" * 48
    with pytest.raises(refvalues.RefValuesError, match="signature"):
        refvalues.verify_document(json.dumps(envelope), key.public_key())
    with pytest.raises(refvalues.RefValuesError, match="signature"):
        refvalues.verify_document(text, Ed25519PrivateKey.generate().public_key())


def test_check_artefacts_names_a_flipped_file(refvalues: ModuleType, artefacts: Path) -> None:
    doc = document(refvalues, artefacts)
    assert refvalues.check_artefacts(doc, artefacts) == []
    data = bytearray((artefacts / "root.img").read_bytes())
    data[3] ^= 0x01
    (artefacts / "root.img").write_bytes(bytes(data))
    assert refvalues.check_artefacts(doc, artefacts) == ["root.img"]


def test_golden_boot_becomes_a_policy_the_broker_loads(
    refvalues: ModuleType, artefacts: Path
) -> None:
    from tdllm_attest.policy_format import sign_policy

    key = Ed25519PrivateKey.generate()
    doc = document(refvalues, artefacts)
    policy = load_policy(
        sign_policy(refvalues.policy_from_golden(doc, golden_for(doc)), key), key.public_key()
    )
    (allowed,) = policy.measurements
    assert allowed.mr_td == bytes.fromhex("11" * 48)
    assert allowed.rtmr2 == bytes.fromhex("44" * 48)
    assert policy.rtmr3 == "zero"


def test_rejects_a_golden_boot_of_another_uki(refvalues: ModuleType, artefacts: Path) -> None:
    doc = document(refvalues, artefacts)
    golden = golden_for(doc) | {"uki_sha384": "99" * 48}
    with pytest.raises(refvalues.RefValuesError, match="another UKI"):
        refvalues.policy_from_golden(doc, golden)


def test_cli_signs_verifies_and_reports_one_line_errors(artefacts: Path, tmp_path: Path) -> None:
    script = [sys.executable, str(IMAGE_DIR / "refvalues.py")]
    key = tmp_path / "keys" / "dev.pem"
    out = artefacts / "reference-values.json"
    signed = subprocess.run(
        [
            *script,
            *("sign", "--artefacts", artefacts, "--profile", "smoke"),
            *("--verity-root-hash", ROOT_HASH, "--verity-salt", "00" * 32),
            *("--source-date-epoch", "1735689600", "--repo", tmp_path, "--key", key),
            *("--create-dev-key", "--out", out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert signed.returncode == 0, signed.stderr
    assert "UNSAFE development signing key" in signed.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    pub = out.with_suffix(".pub")
    assert pub.read_bytes() == Ed25519PrivateKey.from_private_bytes(
        _raw_private(key)
    ).public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)

    ok = subprocess.run(
        [*script, "verify", out, "--key-pub", pub, "--artefacts", artefacts],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr

    (artefacts / "initrd.img").write_bytes(b"changed")
    bad = subprocess.run(
        [*script, "verify", out, "--key-pub", pub, "--artefacts", artefacts],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1
    assert bad.stderr == "error: artefact digest mismatch: initrd.img\n"


def _raw_private(path: Path) -> bytes:
    from cryptography.hazmat.primitives.serialization import (
        NoEncryption,
        PrivateFormat,
        load_pem_private_key,
    )

    key = load_pem_private_key(path.read_bytes(), password=None)
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
