"""The fresh-process load probe behind `tdllm bench unseal` loads both formats for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tdllm.model.checkpoint import save_hf_directory

from .synthetic import Sealer, synthetic_checkpoint


def probe(kind: str, folder: Path, key: bytes = b"") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tdllm_lab.bench.load_probe", kind, str(folder)],
        input=key.hex() + "\n",
        capture_output=True,
        text=True,
        check=False,
    )


def test_probe_times_a_plain_and_a_sealed_load_in_fresh_processes(
    seal_tiny: Sealer, tmp_path: Path
) -> None:
    key = os.urandom(32)
    sealed = seal_tiny(synthetic_checkpoint(seed=3), data_key=key)
    plain = tmp_path / "plain"
    save_hf_directory(synthetic_checkpoint(seed=3), plain)
    for kind, folder in (("plain", plain), ("sealed", sealed)):
        done = probe(kind, folder, key)
        assert done.returncode == 0, done.stderr
        row = json.loads(done.stdout)
        assert row["kind"] == kind and row["wall_s"] > 0 and row["minor_faults"] > 0


def test_probe_fails_on_a_wrong_key(seal_tiny: Sealer) -> None:
    sealed = seal_tiny(synthetic_checkpoint(seed=3), data_key=os.urandom(32))
    done = probe("sealed", sealed, os.urandom(32))
    assert done.returncode != 0 and "SealedModelError" in done.stderr
