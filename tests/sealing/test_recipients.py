"""Recipient key pairs: how they are written, read, and refused."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from jwcrypto import jwk  # type: ignore[import-untyped]

from tdllm.errors import UsageError
from tdllm.sealing.reader import open_sealed
from tdllm.sealing.recipients import load_private_key, load_public_key, write_key_pair

from .synthetic import Sealer, synthetic_checkpoint


@pytest.mark.parametrize("curve", ["X25519", "P-384"])
def test_keygen_writes_a_private_key_only_its_owner_can_read(tmp_path: Path, curve: str) -> None:
    pub, key = write_key_pair(tmp_path / "owner", curve)
    assert (pub.name, key.name) == ("owner.pub", "owner.key")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    public, private = json.loads(pub.read_text()), json.loads(key.read_text())
    assert "d" not in public and "d" in private
    assert public["crv"] == private["crv"] == curve
    assert public["kid"] == private["kid"]


def test_keygen_never_overwrites_a_key(tmp_path: Path) -> None:
    _, key = write_key_pair(tmp_path / "owner", "X25519")
    before = key.read_bytes()
    with pytest.raises(UsageError, match="exists"):
        write_key_pair(tmp_path / "owner", "X25519")
    assert key.read_bytes() == before


def test_a_public_key_cannot_open_a_model(recipient: tuple[Path, Path]) -> None:
    with pytest.raises(UsageError, match="public key"):
        load_private_key(recipient[0])


def test_refuses_keys_on_other_curves(tmp_path: Path) -> None:
    path = tmp_path / "p256.pub"
    path.write_text(jwk.JWK.generate(kty="EC", crv="P-256").export_public())
    with pytest.raises(UsageError, match="X25519 or P-384"):
        load_public_key(path)


def test_refuses_a_file_that_is_not_a_key(tmp_path: Path) -> None:
    path = tmp_path / "junk.key"
    path.write_text("not a key")
    with pytest.raises(UsageError, match="not a readable"):
        load_private_key(path)


def test_pem_keys_work_as_recipient_and_as_opening_key(tmp_path: Path, seal_tiny: Sealer) -> None:
    pair = jwk.JWK.generate(kty="EC", crv="P-384")
    (tmp_path / "r.pem").write_bytes(pair.export_to_pem())
    (tmp_path / "r.key.pem").write_bytes(pair.export_to_pem(private_key=True, password=None))
    source = synthetic_checkpoint(seed=2)
    folder = seal_tiny(source, recipients=[load_public_key(tmp_path / "r.pem")])
    opened = dict(open_sealed(folder, tmp_path / "r.key.pem").tensors())
    assert opened.keys() == dict(source.tensors()).keys()
