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
`--policy-key`; the signing key lives only in memory and is new at every start).
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from tdllm.errors import TdllmError
from tdllm.sealing.reader import is_sealed_directory
from tdllm_attest.broker.keystore import Keystore, load_kek

POLICY_NAME = "simulated-appliance"
KEK_FILE = "UNSAFE-dev-broker-kek.bin"
KEYSTORE_FILE = "UNSAFE-dev-keystore.json"
ROOT_FILE = "UNSAFE-simulated-root.der"
# the client's reference values for the simulated TD, signed by a key made in memory at every
# start (never stored); its public half is written next to the policy
CLIENT_POLICY_FILE = "UNSAFE-simulated-td-policy.json"
POLICY_KEY_FILE = "UNSAFE-dev-policy-key.pub.pem"
PRIVATE_CACHE = "private-models"
PRIVATE_K = 2
# per served model: (sealed directory, key id at the broker)
MODELS = {
    "private": ("sealed-zorblax-k2", "model/appliance-private-k2/1"),
    "bundled": ("sealed-bundled", "model/appliance-dev/1"),
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


def _seal(model: str, folder: Path, out: Path, data_key: bytes, key_id: str) -> None:
    """Runs in a child process: the appliance's parent must not start torch threads before fork.

    For the private model: train it once (cached), then seal it with exactly its public prefix
    (embedding + blocks ``0..L-K-1``, the bundled base's bytes) in the clear and everything
    else encrypted.
    """
    from tdllm.model.checkpoint import open_checkpoint
    from tdllm.sealing.writer import seal_checkpoint

    if model == "bundled":
        seal_checkpoint(open_checkpoint("bundled"), out, data_key=data_key, key_id=key_id)
        return
    from tdllm.protection.private_cache import private_model_dir
    from tdllm.trusted.split import prefix_names

    source = private_model_dir(folder / PRIVATE_CACHE, PRIVATE_K, log=print)
    checkpoint = open_checkpoint(source)
    public = prefix_names(checkpoint.config.num_layers - PRIVATE_K)
    print(f"sealing the private model (tail encrypted, public prefix in the clear) into {out}")
    seal_checkpoint(checkpoint, out, data_key=data_key, key_id=key_id, public_patterns=public)


def prepare_state(folder: Path, echo: object = print, model: str = "private") -> ApplianceState:
    """Create (once) or load the KEK, keystore and the sealed `model` under `folder`."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    kek_path, store_path = folder / KEK_FILE, folder / KEYSTORE_FILE
    state_files = kek_path.exists() and store_path.exists()
    keystore = Keystore.load(store_path, load_kek(kek_path)) if state_files else None
    sealed_name, key_id = MODELS[model]
    sealed = folder / sealed_name
    if keystore is not None and keystore.get(key_id) and is_sealed_directory(sealed):
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
        target=_seal, args=(model, folder, partial, data_key, key_id), name="tdllm-seal"
    )
    child.start()
    child.join()
    if child.exitcode != 0:
        raise TdllmError(f"preparing the {model} model failed (exit {child.exitcode})")
    if keystore is None:
        kek = secrets.token_bytes(32)
        keystore = Keystore([], kek)
        _write_private(kek_path, kek)
    keystore.wrap(key_id, POLICY_NAME, {"simulated"}, data_key)
    _write_private(store_path, keystore.to_json().encode())
    partial.rename(sealed)
    return ApplianceState(folder, keystore, model)
