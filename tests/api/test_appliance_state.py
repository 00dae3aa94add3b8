"""The dev appliance's local state: what is reused, and what is sealed again."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from tdllm_attest.broker.keystore import Keystore
from tdllm_lab.appliance_state import KEK_FILE, KEYSTORE_FILE, _load_keystore


def test_a_keystore_from_before_model_versions_is_discarded_so_the_models_are_sealed_again(
    tmp_path: Path,
) -> None:
    (tmp_path / KEK_FILE).write_bytes(secrets.token_bytes(32))
    old = {"version": 1, "keys": [{"key_id": "k", "policy": "p", "modes": ["simulated"]}]}
    (tmp_path / KEYSTORE_FILE).write_text(json.dumps(old))
    said: list[str] = []
    assert _load_keystore(tmp_path / KEK_FILE, tmp_path / KEYSTORE_FILE, said.append) is None
    assert "discarding the old UNSAFE dev broker state" in said[0]


def test_a_current_keystore_is_reused(tmp_path: Path) -> None:
    kek = secrets.token_bytes(32)
    store = Keystore([], kek)
    store.wrap("k", "p", {"simulated"}, b"d" * 32, model="m", version=1)
    (tmp_path / KEK_FILE).write_bytes(kek)
    (tmp_path / KEYSTORE_FILE).write_text(store.to_json())
    loaded = _load_keystore(tmp_path / KEK_FILE, tmp_path / KEYSTORE_FILE, print)
    assert loaded is not None and loaded.get("k") == store.get("k")
