"""The dev appliance's local state in ``.tdllm/``: a broker KEK + keystore and the sealed model.

`make run` seals the bundled model once under a fresh data key, keeps that key only wrapped in
the broker's keystore (under a KEK stored next to it, 0600, named UNSAFE: anyone with this
directory opens the model) and reuses both on later runs. The simulated TDX platform is NOT
stored: it is generated in memory at every start (see `appliance`), and only its PUBLIC root
certificate is written, so clients (`tdllm chat --e2e --simulated-root`) can verify against it.
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

KEY_ID = "model/appliance-dev/1"
POLICY_NAME = "simulated-appliance"
KEK_FILE = "UNSAFE-dev-broker-kek.bin"
KEYSTORE_FILE = "UNSAFE-dev-keystore.json"
SEALED_DIR = "sealed-bundled"
ROOT_FILE = "UNSAFE-simulated-root.der"


@dataclass(frozen=True)
class ApplianceState:
    folder: Path
    keystore: Keystore

    @property
    def sealed(self) -> Path:
        return self.folder / SEALED_DIR

    @property
    def root_file(self) -> Path:
        return self.folder / ROOT_FILE


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _seal_bundled(out: Path, data_key: bytes) -> None:
    """Runs in a child process: the appliance's parent must not start torch threads before fork."""
    from tdllm.model.checkpoint import open_checkpoint
    from tdllm.sealing.writer import seal_checkpoint

    seal_checkpoint(open_checkpoint("bundled"), out, data_key=data_key, key_id=KEY_ID)


def prepare_state(folder: Path, echo: object = print) -> ApplianceState:
    """Create (once) or load the KEK, keystore and sealed bundled model under `folder`."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    kek_path, store_path = folder / KEK_FILE, folder / KEYSTORE_FILE
    sealed = folder / SEALED_DIR
    if kek_path.exists() and store_path.exists() and is_sealed_directory(sealed):
        kek = load_kek(kek_path)
        return ApplianceState(folder, Keystore.load(store_path, kek))
    echo(f"first run: sealing the bundled model into {sealed} (once)")  # type: ignore[operator]
    shutil.rmtree(sealed, ignore_errors=True)
    partial = folder / (SEALED_DIR + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    data_key, kek = secrets.token_bytes(32), secrets.token_bytes(32)
    child = multiprocessing.get_context("fork").Process(
        target=_seal_bundled, args=(partial, data_key), name="tdllm-seal"
    )
    child.start()
    child.join()
    if child.exitcode != 0:
        raise TdllmError(f"sealing the bundled model failed (exit {child.exitcode})")
    keystore = Keystore([], kek)
    keystore.wrap(KEY_ID, POLICY_NAME, {"simulated"}, data_key)
    _write_private(kek_path, kek)
    _write_private(store_path, keystore.to_json().encode())
    partial.rename(sealed)
    return ApplianceState(folder, keystore)
