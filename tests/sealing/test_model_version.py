"""The owner's model name and version in the authenticated manifest, and the check that a key
released for one model and version opens exactly that one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, hmac

from tdllm.errors import UsageError
from tdllm.model.checkpoint import save_hf_directory
from tdllm.sealing import format as fmt
from tdllm.sealing.errors import SealedModelError, SealedModelMismatch
from tdllm.sealing.reader import open_sealed

from .sealed_dirs import document, write_document
from .synthetic import Sealer, synthetic_checkpoint

TDLLM = str(Path(sys.executable).with_name("tdllm"))


def test_the_manifest_names_the_model_and_version_under_its_mac(seal_tiny: Sealer) -> None:
    key = os.urandom(32)
    folder = seal_tiny(data_key=key, model_name="owner-llm", model_version=7)
    manifest = document(folder)["manifest"]
    assert (manifest["model"], manifest["version"]) == ("owner-llm", 7)
    expect = fmt.ModelVersion("owner-llm", 7)
    assert open_sealed(folder, data_key=key, expect=expect).config is not None
    doc = document(folder)
    doc["manifest"]["version"] = 8  # the host bumps the number of an old version
    write_document(folder, doc)
    with pytest.raises(SealedModelError, match="cannot unseal manifest"):
        open_sealed(folder, data_key=key)


def test_defaults_are_the_source_name_and_version_1(seal_tiny: Sealer) -> None:
    manifest = document(seal_tiny(synthetic_checkpoint()))["manifest"]
    assert (manifest["model"], manifest["version"]) == (synthetic_checkpoint().name, 1)


@pytest.mark.parametrize(
    ("expect", "says"),
    [
        (fmt.ModelVersion("owner-llm", 3), "is model 'owner-llm' version 2"),
        (fmt.ModelVersion("other-llm", 2), "released for model 'other-llm' version 2"),
    ],
)
def test_a_key_released_for_another_model_or_version_is_refused_after_the_mac(
    seal_tiny: Sealer, expect: fmt.ModelVersion, says: str
) -> None:
    key = os.urandom(32)
    folder = seal_tiny(data_key=key, model_name="owner-llm", model_version=2)
    with pytest.raises(SealedModelMismatch, match=says):
        open_sealed(folder, data_key=key, expect=expect)


def test_a_wrong_key_stays_opaque_even_with_an_expected_version(seal_tiny: Sealer) -> None:
    folder = seal_tiny(data_key=os.urandom(32), model_name="owner-llm", model_version=2)
    with pytest.raises(SealedModelError) as info:
        open_sealed(folder, data_key=os.urandom(32), expect=fmt.ModelVersion("x", 9))
    assert not isinstance(info.value, SealedModelMismatch)


def _strip_model_version(folder: Path, key: bytes) -> None:
    """What a manifest sealed before model versions looks like (MAC recomputed with the key)."""
    doc = document(folder)
    manifest = doc["manifest"]
    del manifest["model"], manifest["version"]
    mac = hmac.HMAC(bytes(fmt.derive_key(key, manifest["model_id"], fmt.MAC_KEY)), hashes.SHA256())
    mac.update(fmt.canonical_json(manifest))
    doc["mac"] = mac.finalize().hex()
    write_document(folder, doc)


def test_a_model_sealed_before_versions_opens_with_its_key_but_not_as_a_released_one(
    seal_tiny: Sealer,
) -> None:
    key = os.urandom(32)
    folder = seal_tiny(data_key=key)
    _strip_model_version(folder, key)
    assert open_sealed(folder, data_key=key).config is not None
    with pytest.raises(SealedModelMismatch, match="unversioned"):
        open_sealed(folder, data_key=key, expect=fmt.ModelVersion("owner-llm", 1))


@pytest.mark.parametrize(("name", "version"), [("", 1), ("x", 0), ("x\ny", 1), ("x", 2**53)])
def test_sealing_refuses_a_bad_model_name_or_version(
    seal_tiny: Sealer, name: str, version: int
) -> None:
    with pytest.raises(UsageError, match="--model-version"):
        seal_tiny(data_key=os.urandom(32), model_name=name, model_version=version)


@pytest.mark.e2e
def test_tdllm_seal_takes_the_model_name_and_version(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    save_hf_directory(synthetic_checkpoint(seed=5), plain)
    keys = tmp_path / "owner"
    run = [TDLLM, "keygen", "--out", str(keys)]
    assert subprocess.run(run, capture_output=True, timeout=120, check=False).returncode == 0
    sealed = tmp_path / "sealed"
    identity = ["--model-name", "owner-llm", "--model-version", "4"]
    result = subprocess.run(
        [TDLLM, "seal", str(plain), "--out", str(sealed), "--recipient", f"{keys}.pub", *identity],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "model 'owner-llm' version 4" in result.stdout
    manifest = document(sealed)["manifest"]
    assert (manifest["model"], manifest["version"]) == ("owner-llm", 4)
