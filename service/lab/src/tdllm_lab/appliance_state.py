"""The dev appliance's local state in ``.tdllm/``: a broker KEK + keystore and the sealed model.

`make run` serves the project's private model: the bundled SmolLM2 fine-tuned in its last
K = 2 blocks and an untied lm_head by `tdllm finetune-tail` (trained once into
``.tdllm/private-models/``), sealed with its public prefix in the clear (hash-bound) and its
tail, final norm and lm_head encrypted, and served with the `split` profile. (`--model bundled`
seals and serves the plain bundled model, td-only.) Each model is sealed once under a fresh
data key, kept only wrapped in the broker's keystore (under a KEK stored next to it, 0600,
named UNSAFE: anyone with this directory opens the model); all are reused on later runs. The
simulated TDX platform is NOT stored: it is generated in memory at every start (see
`appliance`), and only its PUBLIC root certificate is written, so clients
(`tdllm chat --e2e --simulated-root`) can verify against it, with the reference values of the
simulated TD as a signed client policy and the PUBLIC key that checks it (`--policy`,
`--policy-key`; the signing key lives only in memory and is new at every start). Likewise the
broker's answer-signing key is made in memory at every start; only its PUBLIC half is written,
for the service to pin (`broker_public_key`). State from before keys were bound to a model
version (a version 1 keystore) is discarded and sealed again.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdllm.errors import TdllmError
from tdllm.sealing.reader import is_sealed_directory
from tdllm_attest.broker.keystore import Keystore, KeystoreError, load_kek

POLICY_NAME = "simulated-appliance"
KEK_FILE = "UNSAFE-dev-broker-kek.bin"
KEYSTORE_FILE = "UNSAFE-dev-keystore.json"
ROOT_FILE = "UNSAFE-simulated-root.der"
# the client's reference values for the simulated TD, signed by a key made in memory at every
# start (never stored); its public half is written next to the policy
CLIENT_POLICY_FILE = "UNSAFE-simulated-td-policy.json"
POLICY_KEY_FILE = "UNSAFE-dev-policy-key.pub.pem"
PRIVATE_CACHE = "private-models"
# the broker's answer-signing key of this start, PUBLIC half (the service pins it)
BROKER_KEY_FILE = "dev-broker-answer-key.pub.pem"
PRIVATE_K = 2
# per served model: (sealed directory, key id at the broker, model name, version)
MODELS = {
    "private": ("sealed-zorblax-k2", "model/appliance-private-k2/1", "appliance-private-k2", 1),
    "bundled": ("sealed-bundled", "model/appliance-dev/1", "appliance-bundled", 1),
}


@dataclass(frozen=True)
class ApplianceState:
    folder: Path
    keystore: Keystore
    model: str = "private"

    @property
    def sealed(self) -> Path:
        return self.folder / MODELS[self.model][0]

    @property
    def key_id(self) -> str:
        return MODELS[self.model][1]

    @property
    def model_name(self) -> str:
        return MODELS[self.model][2]

    @property
    def model_version(self) -> int:
        return MODELS[self.model][3]

    @property
    def broker_key_file(self) -> Path:
        return self.folder / BROKER_KEY_FILE

    @property
    def root_file(self) -> Path:
        return self.folder / ROOT_FILE

    @property
    def policy_file(self) -> Path:
        return self.folder / CLIENT_POLICY_FILE

    @property
    def policy_key_file(self) -> Path:
        return self.folder / POLICY_KEY_FILE


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _seal(model: str, folder: Path, out: Path, data_key: bytes) -> None:
    """Runs in a child process: the appliance's parent must not start torch threads before fork.

    For the private model: train it once (cached), then seal it with exactly its public prefix
    (embedding + blocks ``0..L-K-1``, the bundled base's bytes) in the clear and everything
    else encrypted.
    """
    from tdllm.sources import open_checkpoint
    from tdllm_lab.sealing.writer import seal_checkpoint

    _, key_id, name, version = MODELS[model]
    identity: dict[str, Any] = {"key_id": key_id, "model_name": name, "model_version": version}
    if model == "bundled":
        seal_checkpoint(open_checkpoint("bundled"), out, data_key=data_key, **identity)
        return
    from tdllm.model.transformer import prefix_names
    from tdllm_lab.protection.private_cache import private_model_dir

    source = private_model_dir(folder / PRIVATE_CACHE, PRIVATE_K, log=print)
    checkpoint = open_checkpoint(source)
    public = prefix_names(checkpoint.config.num_layers - PRIVATE_K)
    print(f"sealing the private model (tail encrypted, public prefix in the clear) into {out}")
    seal_checkpoint(checkpoint, out, data_key=data_key, public_patterns=public, **identity)


def _load_keystore(kek_path: Path, store_path: Path, echo: object) -> Keystore | None:
    """The dev keystore, or None when there is none or it cannot serve any more (e.g. one from
    before keys were bound to a model version): its models are then sealed again."""
    if not (kek_path.exists() and store_path.exists()):
        return None
    try:
        return Keystore.load(store_path, load_kek(kek_path))
    except KeystoreError as exc:
        echo(f"discarding the old UNSAFE dev broker state: {exc}")  # type: ignore[operator]
        return None


def prepare_state(folder: Path, echo: object = print, model: str = "private") -> ApplianceState:
    """Create (once) or load the KEK, keystore and the sealed `model` under `folder`."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    kek_path, store_path = folder / KEK_FILE, folder / KEYSTORE_FILE
    keystore = _load_keystore(kek_path, store_path, echo)
    sealed_name, key_id, name, version = MODELS[model]
    sealed = folder / sealed_name
    record = keystore.get(key_id) if keystore is not None else None
    current = record is not None and (record.model, record.version) == (name, version)
    if keystore is not None and current and is_sealed_directory(sealed):
        return ApplianceState(folder, keystore, model)
    what = (
        f"training the private model (K={PRIVATE_K}, ~2-5 minutes on a small CPU) and sealing it"
        if model == "private"
        else "sealing the bundled model"
    )
    echo(f"first run: {what} into {sealed} (once)")  # type: ignore[operator]
    shutil.rmtree(sealed, ignore_errors=True)
    partial = folder / (sealed_name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    data_key = secrets.token_bytes(32)
    child = multiprocessing.get_context("fork").Process(
        target=_seal, args=(model, folder, partial, data_key), name="tdllm-seal"
    )
    child.start()
    child.join()
    if child.exitcode != 0:
        raise TdllmError(f"preparing the {model} model failed (exit {child.exitcode})")
    if keystore is None:
        kek = secrets.token_bytes(32)
        keystore = Keystore([], kek)
        _write_private(kek_path, kek)
    keystore.wrap(key_id, POLICY_NAME, {"simulated"}, data_key, model=name, version=version)
    _write_private(store_path, keystore.to_json().encode())
    partial.rename(sealed)
    return ApplianceState(folder, keystore, model)
