"""An interrupted `tdllm seal` (killed with SIGKILL mid-write, or out of disk space) never leaves
an output directory, so nothing half-written can be opened as a model, and its partial files
hold no plaintext of a sealed tensor."""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tdllm.errors import TdllmError
from tdllm.model.checkpoint import save_hf_directory
from tdllm.sealing.format import MANIFEST_NAME
from tdllm.sealing.reader import open_sealed
from tdllm.sources import open_checkpoint

from .synthetic import synthetic_checkpoint
from .test_no_plaintext import windows

REPO = Path(__file__).parents[2]
TDLLM = str(Path(sys.executable).with_name("tdllm"))
SEED = 21
DEADLINE_S = 120

# `python -c CHILD OUT KEY_HEX SEED pause|run` seals the synthetic model of SEED with the data key
# into OUT, one chunk per 256 bytes; with "pause" it stops for good half-way through its
# tensors, saying so on stdout (the parent kills it there).
CHILD = """
import sys, threading
from pathlib import Path
from tdllm.model.checkpoint import Checkpoint
from tdllm_lab.sealing.writer import seal_checkpoint
from tests.sealing.synthetic import synthetic_checkpoint

out, key, seed, mode = Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
source = synthetic_checkpoint(seed=seed)
names = [name for name, _ in source.tensors()]

def pausing():
    for index, item in enumerate(source.tensors()):
        if index == len(names) // 2 and mode == "pause":
            print("half-way", flush=True)
            threading.Event().wait()
        yield item

paused = Checkpoint(source.name, source.path, source.config, source.tokenizer, pausing)
seal_checkpoint(paused, out, data_key=key, chunk_size=256)
"""


def leaked_tensors(root: Path) -> list[str]:
    """Names of the synthetic model's tensors a 32-byte window of which is in a file under
    `root` (every tensor is sealed here: none should be)."""
    rng = random.Random(7)  # noqa: S311 - reproducible offsets, not a secret
    blobs = [p.read_bytes() for p in root.rglob("*") if p.is_file()]
    leaked = []
    for name, tensor in synthetic_checkpoint(seed=SEED).tensors():
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        if any(w in blob for w in windows(raw, rng) for blob in blobs):
            leaked.append(name)
    return leaked


def test_a_seal_killed_mid_write_leaves_no_output_that_opens_and_no_plaintext(
    tmp_path: Path,
) -> None:
    out, key = tmp_path / "models" / "sealed", os.urandom(32)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out), key.hex(), str(SEED), "pause"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "half-way\n"
        (partial,) = out.parent.iterdir()  # the hidden sibling being written
        data = sorted(partial.glob("weights-*.sealed"))
        assert data and data[0].stat().st_size > 0  # ciphertext already on the disk
    finally:
        child.kill()  # SIGKILL: no handler, no cleanup runs
        assert child.wait(DEADLINE_S) == -signal.SIGKILL
        if child.stdout is not None:
            child.stdout.close()

    assert not out.exists()  # the output appears only complete
    assert partial.name.startswith(".sealed.sealing-")
    assert not (partial / MANIFEST_NAME).exists()
    with pytest.raises(TdllmError):  # nor can the leftover be opened, whoever points at it
        open_sealed(partial, data_key=key)
    with pytest.raises(TdllmError):
        open_checkpoint(partial)
    assert leaked_tensors(tmp_path) == []

    # sealing again needs no cleaning up first, and gives the complete model
    subprocess.run(
        [sys.executable, "-c", CHILD, str(out), key.hex(), str(SEED), "run"],
        cwd=REPO,
        check=True,
        timeout=DEADLINE_S,
    )
    reopened = dict(open_sealed(out, data_key=key).tensors())
    for name, tensor in synthetic_checkpoint(seed=SEED).tensors():
        assert torch.equal(reopened[name], tensor), name


def _no_bigger_files_than(limit: int) -> None:
    """In the child: writing past `limit` bytes fails with EFBIG (Python ignores SIGXFSZ),
    the way a full disk fails a write with ENOSPC."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_seal_that_runs_out_of_space_says_so_and_leaves_nothing_behind(tmp_path: Path) -> None:
    source = tmp_path / "plain"
    save_hf_directory(synthetic_checkpoint(seed=SEED), source)
    keys = tmp_path / "keys"
    keys.mkdir()
    made = subprocess.run(
        [TDLLM, "keygen", "--out", str(keys / "owner")], capture_output=True, timeout=DEADLINE_S
    )
    assert made.returncode == 0, made.stderr
    out = tmp_path / "models" / "sealed"
    limit = 16 * 1024  # below one data file of the synthetic model (about 90 kB)
    result = subprocess.run(
        [TDLLM, "seal", str(source), "--out", str(out), "--recipient", str(keys / "owner.pub")],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        preexec_fn=lambda: _no_bigger_files_than(limit),
        env=os.environ | {"PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: cannot write {out}: File too large"]
    assert not out.exists() and list(out.parent.iterdir()) == []  # the partial sibling is gone
    assert leaked_tensors(tmp_path / "models") == []
