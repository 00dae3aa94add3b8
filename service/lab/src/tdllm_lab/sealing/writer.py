"""Seal a checkpoint: stream its tensors, encrypt them chunk by chunk, write the manifest last.

Only ciphertext (and the tensors the caller chose to make public) ever reaches the disk: each
tensor is encrypted from its in-memory bytes into a reused buffer and written from there; no
plaintext temporary files, and the data key is never written anywhere except wrapped inside a
JWE.

Everything is written into a hidden sibling directory (``.NAME.sealing-RANDOM``), fsynced, and
renamed to the output only once the manifest is in it: an interrupted seal (killed, disk full)
never leaves an output directory at all, let alone one that opens. A failure that Python sees
removes the sibling; a kill leaves it (ciphertext and public tensors only, no manifest) to be
deleted by hand.

With `keep_quantized`, a GGUF source's quantized weights are sealed as their raw blocks (format
version 2, `fmt.QUANTIZED`): the sealed model is as small as the GGUF file, and the int kernels
load the very blocks plain GGUF loading gives them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tqdm import tqdm

from tdllm.errors import UsageError
from tdllm.model.checkpoint import Checkpoint, GgufTensors, NamedWeights
from tdllm.model.gguf_blocks import GgufQuantized
from tdllm.sealing import format as fmt
from tdllm.sealing.keys import wipe
from tdllm.sealing.recipients import wrap_data_key


@dataclass
class SealReport:
    """What `seal_checkpoint` wrote (sizes only, never content)."""

    path: Path
    model_id: str
    key_id: str
    recipients: int
    model: str = ""
    version: int = fmt.DEFAULT_MODEL_VERSION
    format: str = fmt.FORMAT
    sealed_tensors: int = 0
    public_tensors: int = 0
    quantized_tensors: int = 0  # of those (sealed or public), stored as GGUF blocks
    plaintext_bytes: int = 0
    stored_bytes: int = 0
    files: list[str] = field(default_factory=list)


def seal_checkpoint(
    checkpoint: Checkpoint,
    out: Path,
    recipients: Sequence[Any] = (),
    *,
    data_key: bytes | bytearray | None = None,
    key_id: str | None = None,
    model_name: str | None = None,
    model_version: int = fmt.DEFAULT_MODEL_VERSION,
    dtype: torch.dtype | None = None,
    seal_patterns: Sequence[str] = (),
    public_patterns: Sequence[str] = (),
    chunk_size: int = fmt.DEFAULT_CHUNK_SIZE,
    max_file_size: int = fmt.DEFAULT_MAX_FILE_SIZE,
    keep_quantized: bool = False,
) -> SealReport:
    """Write `checkpoint` to the new directory `out` as a sealed model.

    `recipients` are public keys (jwcrypto JWKs) the data key is wrapped to. With no recipients
    the caller must pass `data_key` and keep it (a key broker does); otherwise nobody could ever
    open the result. A tensor is stored public (in the clear, hash-bound by the manifest) only
    when it matches a public pattern and no seal pattern; everything else is sealed.
    `model_name` (default: the checkpoint's name) and `model_version` name the owner's model in
    the authenticated manifest: the TD takes a key only for exactly that model and version, so
    seal every new version with a higher number (older ones are then refusable rollbacks).
    `keep_quantized` (a GGUF source only) stores its quantized 2-D weights as their GGUF blocks
    (format version 2; `dtype` then applies to the float tensors alone).
    """
    if not recipients and data_key is None:
        raise UsageError("no recipient: give at least one --recipient public key")
    if data_key is not None and len(data_key) != fmt.DATA_KEY_BYTES:
        raise UsageError("a data key is 32 bytes (AES-256)")
    if chunk_size < 1:
        raise UsageError("chunk size must be positive")
    if dtype is not None and dtype not in fmt.DTYPE_NAMES:
        raise UsageError(f"cannot store tensors as {dtype}")
    if keep_quantized and not isinstance(checkpoint.tensors, GgufTensors):
        raise UsageError(
            f"--keep-quantized takes a GGUF source (bundled or a .gguf file); "
            f"{checkpoint.path} has no GGUF blocks"
        )
    identity = _model_version(checkpoint.name if model_name is None else model_name, model_version)
    work = _prepare_directory(out)
    model_id = os.urandom(16).hex()
    key = bytearray(data_key) if data_key is not None else bytearray(os.urandom(32))
    chunk_key = fmt.derive_key(key, model_id, fmt.CHUNK_KEY)
    mac_key = fmt.derive_key(key, model_id, fmt.MAC_KEY)
    report = SealReport(
        out,
        model_id,
        key_id or f"model/{model_id}",
        len(recipients),
        identity.model,
        identity.version,
        fmt.FORMAT_QUANTIZED if keep_quantized else fmt.FORMAT,
    )
    try:
        entries = _write_tensors(
            checkpoint,
            work,
            _Plan(
                report.format,
                model_id,
                dtype,
                seal_patterns,
                public_patterns,
                chunk_size,
                max_file_size,
            ),
            AESGCM(chunk_key),
            report,
        )
        manifest = {
            "format": report.format,
            "model_id": model_id,
            "key_id": report.key_id,
            "name": checkpoint.name,
            "model": identity.model,
            "version": identity.version,
            "cipher": fmt.CIPHER,
            "chunk_size": chunk_size,
            "config": checkpoint.config.to_hf(),
            "tokenizer": _tokenizer_json(checkpoint),
            "files": [{"name": n, "size": (work / n).stat().st_size} for n in report.files],
            "tensors": [e.to_json() for e in entries],
        }
        mac = hmac.HMAC(mac_key, hashes.SHA256())
        mac.update(fmt.canonical_json(manifest))
        document = {
            "format": report.format,
            "manifest": manifest,
            "mac": mac.finalize().hex(),
            "recipients": [wrap_data_key(key, r, model_id, report.key_id) for r in recipients],
        }
        _write_synced(work / fmt.MANIFEST_NAME, fmt.canonical_json(document))
        _fsync_path(work)  # the names inside it, before the rename publishes them
        os.rename(work, out)  # atomic; replaces `out` only if it is an empty directory
        _fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        wipe(key, chunk_key, mac_key)
    return report


@dataclass(frozen=True)
class _Plan:
    version: str  # the format version, in every chunk's AAD
    model_id: str
    dtype: torch.dtype | None
    seal_patterns: Sequence[str]
    public_patterns: Sequence[str]
    chunk_size: int
    max_file_size: int

    def is_public(self, name: str) -> bool:
        def matches(patterns: Sequence[str]) -> bool:
            return any(fnmatch.fnmatchcase(name, p) for p in patterns)

        return matches(self.public_patterns) and not matches(self.seal_patterns)


def _model_version(name: str, version: int) -> fmt.ModelVersion:
    try:
        return fmt.ModelVersion(name, version)
    except ValueError:
        raise UsageError(
            f"model name {name[:40]!r} / version {version!r}: the name must be 1..200 printable "
            "characters and the version an integer from 1 to 2**53-1 (--model-name, "
            "--model-version)"
        ) from None


def _prepare_directory(out: Path) -> Path:
    """The hidden sibling of `out` to write into (`out` itself appears only when complete)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.sealing-{os.urandom(6).hex()}"
    work.mkdir()
    return work


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tokenizer_json(checkpoint: Checkpoint) -> dict[str, Any]:
    tok = checkpoint.tokenizer
    return {
        "tokenizer_json": tok.backend.to_str(),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "chat_template": tok.chat_template,
        "add_bos": tok.add_bos,
    }


def _write_tensors(
    checkpoint: Checkpoint, out: Path, plan: _Plan, aead: AESGCM, report: SealReport
) -> list[fmt.TensorEntry]:
    entries: list[fmt.TensorEntry] = []
    seen: set[str] = set()
    buffer = bytearray(plan.chunk_size + fmt.TAG_BYTES)  # ciphertext only, reused per chunk
    bar = tqdm(
        desc="sealing", unit="B", unit_scale=True, disable=not sys.stderr.isatty(), leave=False
    )
    with _DataFiles(out, plan.max_file_size, report.files) as files, bar:
        for name, item in _stream(checkpoint, plan):
            if name in seen:
                raise UsageError(f"the checkpoint has tensor {name} twice")
            seen.add(name)
            dtype, shape, raw = _stored(name, item, plan)
            report.quantized_tensors += dtype in fmt.QUANTIZED
            entry = fmt.TensorEntry(
                name=name,
                dtype=dtype,
                shape=shape,
                protection=fmt.PUBLIC if plan.is_public(name) else fmt.SEALED,
                file="",
                offset=0,
                length=0,
                chunks=0,
                sha256=None,
            )
            if entry.protection == fmt.PUBLIC:
                length = len(raw)
                file, offset = files.reserve(length)
                files.write(raw)
                entry = replace(entry, file=file, offset=offset, length=length, sha256=_sha256(raw))
                report.public_tensors += 1
            else:
                chunks = fmt.chunk_count(len(raw), plan.chunk_size)
                length = len(raw) + chunks * fmt.CHUNK_OVERHEAD
                file, offset = files.reserve(length)
                for index in range(chunks):
                    piece = raw[index * plan.chunk_size : (index + 1) * plan.chunk_size]
                    aad = fmt.chunk_aad(
                        plan.version, plan.model_id, name, entry.dtype, entry.shape, index, chunks
                    )
                    nonce = os.urandom(fmt.NONCE_BYTES)
                    sealed = memoryview(buffer)[: len(piece) + fmt.TAG_BYTES]
                    aead.encrypt_into(nonce, piece, aad, sealed)
                    files.write(nonce)
                    files.write(sealed)
                entry = replace(entry, file=file, offset=offset, length=length, chunks=chunks)
                report.sealed_tensors += 1
            entries.append(entry)
            report.plaintext_bytes += len(raw)
            report.stored_bytes += length
            bar.update(len(raw))
    return entries


def _stream(checkpoint: Checkpoint, plan: _Plan) -> NamedWeights:
    """The checkpoint's tensors; in version 2, a GGUF source's quantized ones as their blocks."""
    if plan.version == fmt.FORMAT_QUANTIZED and isinstance(checkpoint.tensors, GgufTensors):
        return checkpoint.tensors.with_blocks()
    return iter(checkpoint.tensors())


def _stored(
    name: str, item: torch.Tensor | GgufQuantized, plan: _Plan
) -> tuple[str, list[int], memoryview]:
    """(dtype name, shape, plaintext bytes) of one tensor as it is stored."""
    if isinstance(item, GgufQuantized):
        if item.kind in fmt.QUANTIZED:  # the blocks, rows in HF order, byte for byte
            raw = np.ascontiguousarray(item.blocks).reshape(-1).data
            return item.kind, list(item.shape), raw
        item = item.dequantize()  # a block type the format does not store: as floats
    stored = item.detach().to("cpu", plan.dtype or item.dtype).contiguous()
    if stored.dtype not in fmt.DTYPE_NAMES:
        raise UsageError(f"tensor {name} has dtype {stored.dtype}; use --dtype")
    return (
        fmt.DTYPE_NAMES[stored.dtype],
        list(stored.shape),
        stored.reshape(-1).view(torch.uint8).numpy().data,
    )


def _sha256(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class _DataFiles:
    """Appends tensors to weights-NNNNN.sealed, starting a new file before one that would make
    the current file exceed `max_size` (a single larger tensor gets a file of its own)."""

    def __init__(self, out: Path, max_size: int, names: list[str]) -> None:
        self.out = out
        self.max_size = max_size
        self.names = names
        self.file: IO[bytes] | None = None
        self.offset = 0

    def reserve(self, length: int) -> tuple[str, int]:
        if self.file is None or (self.offset and self.offset + length > self.max_size):
            self._next()
        return self.names[-1], self.offset

    def write(self, data: bytes | memoryview) -> None:
        if self.file is None:
            raise RuntimeError("reserve() before write()")
        self.file.write(data)
        self.offset += len(data)

    def _next(self) -> None:
        self._close()
        name = fmt.DATA_FILE_PATTERN.format(len(self.names))
        self.file = open(self.out / name, "xb")  # closed in _next / __exit__
        self.names.append(name)
        self.offset = 0

    def __enter__(self) -> _DataFiles:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close(sync=exc_type is None)

    def _close(self, sync: bool = True) -> None:
        """Flush the current file to the disk: the manifest must never outlive its data."""
        if self.file is not None:
            file, self.file = self.file, None
            with file:
                if sync:
                    file.flush()
                    os.fsync(file.fileno())
