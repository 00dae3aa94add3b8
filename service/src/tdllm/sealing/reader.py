"""Open a sealed model directory: unwrap the data key, verify the manifest, stream plaintext.

The order is what makes failures safe: the manifest MAC is verified before any field of the
manifest is used and before a single tensor is yielded; each tensor is decrypted chunk by chunk
straight into its own tensor memory, and a tensor is yielded only once every chunk of it has
authenticated (a failed tensor is zeroed first). Every failure, whatever its cause, becomes one
`SealedModelError` naming only the tensor or "manifest".

Rows that hold GGUF blocks (format version 2) are decrypted the same way into a byte buffer and
yielded as `GgufQuantized` to the model loader (`tensors_into`), which hands them to the int
kernels as plain GGUF's blocks are, or dequantizes them; `tensors()` yields them as fp32.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import weakref
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tokenizers import Tokenizer as BpeBackend
from tqdm import tqdm

from tdllm.errors import ModelLoadError, UsageError
from tdllm.model.checkpoint import Checkpoint, Destination
from tdllm.model.config import ModelConfig
from tdllm.model.gguf_blocks import GgufQuantized
from tdllm.model.tokenizer import Tokenizer
from tdllm.sealing import format as fmt
from tdllm.sealing.errors import SealedModelError, SealedModelMismatch
from tdllm.sealing.keys import wipe
from tdllm.sealing.recipients import load_private_key, unwrap_data_key

MANIFEST = "manifest"
_MODEL_ID = re.compile(r"[0-9a-f]{32}")
_DATA_FILE = re.compile(r"weights-[0-9]{5}\.sealed")
MIN_BYTES_PER_THREAD = 4 << 20  # smaller tensors are not worth a thread hand-off
DEFAULT_THREADS = min(4, os.cpu_count() or 1)
_MAC = re.compile(r"[0-9a-f]{64}")  # lowercase only: one encoding per MAC, no malleable case


def is_sealed_directory(path: Path) -> bool:
    """Whether `path` looks like a sealed model: the manifest, or sealed data files without it
    (the manifest is written last: `open_sealed` refuses such a cut-off directory, rather than
    it being read as something else)."""
    return (path / fmt.MANIFEST_NAME).is_file() or any(path.glob("weights-*.sealed"))


def open_sealed(
    path: Path,
    key_file: Path | None = None,
    *,
    data_key: bytes | bytearray | None = None,
    model_id: str | None = None,
    expect: fmt.ModelVersion | None = None,
    threads: int = DEFAULT_THREADS,
) -> Checkpoint:
    """Open the sealed model in `path` with a recipient private key file or the raw data key.

    `model_id`, when given, pins the model: a directory holding any other model (even one
    correctly sealed to the same recipient) is refused. `expect` is the model and version the
    key was released for: an authentic manifest that names another one (an older version put
    back on the disk, say) raises `SealedModelMismatch`, which says what differs. Config and
    tokenizer come from the authenticated manifest; the returned checkpoint's `tensors()` can be
    streamed once (the key is wiped when that stream ends); open the directory again to reload.
    `threads` decrypt the chunks of large tensors in parallel (default: up to 4, one per core).
    """
    if (key_file is None) == (data_key is None):
        raise UsageError(f"{path} is a sealed model: give exactly one key to open it (--key)")
    private_key = load_private_key(key_file) if key_file is not None else None
    try:
        return _open(path, private_key, data_key, model_id, expect, max(1, threads))
    except SealedModelError:
        raise
    except Exception:  # every cause collapses into one opaque error, on purpose
        raise SealedModelError(path, MANIFEST) from None


def _open(
    path: Path,
    private_key: Any,
    data_key: bytes | bytearray | None,
    model_id: str | None,
    expect: fmt.ModelVersion | None,
    threads: int,
) -> Checkpoint:
    raw = _read_limited(path / fmt.MANIFEST_NAME)
    document = json.loads(raw.decode("utf-8"))  # strict UTF-8, strict JSON (no control chars)
    manifest = document["manifest"]
    if document["format"] not in fmt.FORMATS or not isinstance(manifest, dict):
        raise ValueError("not this format")
    found_id = manifest["model_id"]
    if not isinstance(found_id, str) or not _MODEL_ID.fullmatch(found_id):
        raise ValueError("bad model id")
    if data_key is not None:
        key = bytearray(data_key)
    else:
        key = unwrap_data_key(document["recipients"], private_key, found_id)
    mac_key = fmt.derive_key(key, found_id, fmt.MAC_KEY)
    chunk_key = fmt.derive_key(key, found_id, fmt.CHUNK_KEY)
    wipe(key)
    try:
        mac = hmac.HMAC(mac_key, hashes.SHA256())
        mac.update(fmt.canonical_json(manifest))
        if not isinstance(document["mac"], str) or not _MAC.fullmatch(document["mac"]):
            raise ValueError("bad mac encoding")
        mac.verify(bytes.fromhex(document["mac"]))  # constant-time; raises InvalidSignature
        # -- from here on the manifest is authentic --------------------------------------------
        if manifest["format"] != document["format"]:
            raise ValueError("format")
        if model_id is not None and found_id != model_id:
            raise ValueError("another model")
        _check_model_version(path, manifest, expect)
        source = _SealedTensors.from_manifest(path, manifest, chunk_key, threads)
        config = ModelConfig.from_hf(manifest["config"])
        tokenizer = _tokenizer(manifest["tokenizer"])
    except BaseException:
        wipe(chunk_key)
        raise
    finally:
        wipe(mac_key)
    return Checkpoint(
        str(manifest["name"]),
        path,
        config,
        tokenizer,
        source.floats,
        source.stream,
        identity=fmt.manifest_identity(manifest),
    )


def _check_model_version(
    path: Path, manifest: dict[str, Any], expect: fmt.ModelVersion | None
) -> None:
    """Only on an authenticated manifest: is it the model and version the key is for?"""
    found = fmt.manifest_model_version(manifest)  # a malformed pair raises: opaque, as any edit
    if expect is not None and found != expect:
        what = str(found) if found else "unversioned (sealed before model versions)"
        raise SealedModelMismatch(path, what, str(expect))


def _read_limited(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read(fmt.MAX_MANIFEST_BYTES + 1)
    if len(raw) > fmt.MAX_MANIFEST_BYTES:
        raise ValueError("manifest too large")
    return raw


def _tokenizer(spec: dict[str, Any]) -> Tokenizer:
    def opt_int(value: Any) -> int | None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise TypeError("token id")
        return value

    template = spec["chat_template"]
    if template is not None and not isinstance(template, str):
        raise TypeError("chat template")
    return Tokenizer(
        BpeBackend.from_str(spec["tokenizer_json"]),
        bos_token_id=opt_int(spec["bos_token_id"]),
        eos_token_id=opt_int(spec["eos_token_id"]),
        chat_template=template,
        add_bos=bool(spec["add_bos"]),
    )


@dataclass
class _SealedTensors:
    """The tensors of one opened sealed model and the chunk key that decrypts them."""

    path: Path
    version: str
    model_id: str
    chunk_size: int
    entries: list[fmt.TensorEntry]
    file_sizes: dict[str, int]
    chunk_key: bytearray
    threads: int
    streamed: bool = False

    @classmethod
    def from_manifest(
        cls, path: Path, manifest: dict[str, Any], chunk_key: bytearray, threads: int
    ) -> _SealedTensors:
        chunk_size = manifest["chunk_size"]
        if manifest["cipher"] != fmt.CIPHER or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError("unsupported cipher or chunk size")
        sizes = {str(f["name"]): int(f["size"]) for f in manifest["files"]}
        quantized = manifest["format"] == fmt.FORMAT_QUANTIZED  # version 1 has float rows only
        entries = [
            fmt.TensorEntry.from_json(row, chunk_size, quantized) for row in manifest["tensors"]
        ]
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor")
        for name, size in sizes.items():
            # a truncated, extended or missing file fails here, before anything is yielded
            if not _DATA_FILE.fullmatch(name) or (path / name).stat().st_size != size:
                raise ValueError("data file")
        for e in entries:
            if e.file not in sizes or e.offset + e.length > sizes[e.file]:
                raise ValueError("tensor outside its file")
        source = cls(
            path,
            manifest["format"],
            manifest["model_id"],
            chunk_size,
            entries,
            sizes,
            chunk_key,
            threads,
        )
        # wipe the key even if nobody ever streams (the checkpoint is simply dropped)
        weakref.finalize(source, wipe, chunk_key)
        return source

    def floats(self) -> Iterator[tuple[str, torch.Tensor]]:
        """`stream` for consumers that take float tensors only: GGUF block rows as fp32 (their
        decrypted blocks are zeroed once dequantized: best effort, the floats stay)."""
        for name, item in self.stream():
            if isinstance(item, GgufQuantized):
                floats = item.dequantize()
                item.blocks.fill(0)
                yield name, floats
            else:
                yield name, item

    def stream(
        self, into: Destination | None = None
    ) -> Iterator[tuple[str, torch.Tensor | GgufQuantized]]:
        """Yield (name, tensor) in manifest order, each fully authenticated before it is yielded.

        With `into`, a tensor is decrypted straight into the memory `into` names for it (the
        model's own parameter); that memory is zeroed if the tensor fails. A GGUF block row
        comes as `GgufQuantized` over a fresh byte buffer (never `into`'s float memory).
        """
        if self.streamed:
            raise ModelLoadError(f"{self.path}: a sealed checkpoint streams once; open it again")
        self.streamed = True
        files: dict[str, int] = {}
        bar = tqdm(
            total=sum(e.nbytes for e in self.entries),
            desc="unsealing",
            unit="B",
            unit_scale=True,
            disable=not sys.stderr.isatty(),
            leave=False,
        )
        pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        # Small tensors are decrypted whole, several at a time (a window of in-flight tensors),
        # and still yielded in order, each only once authenticated; a large one is split into
        # runs across the threads instead. Most tensors of a small model are below the split
        # size, so without the window they would decrypt on one thread.
        window: deque[tuple[fmt.TensorEntry, torch.Tensor, Future[None]]] = deque()
        try:
            aead = AESGCM(self.chunk_key)
            for entry in self.entries:
                tensor = _allocate(entry, into)
                try:
                    if entry.file not in files:
                        files[entry.file] = os.open(self.path / entry.file, os.O_RDONLY)
                except OSError:
                    raise SealedModelError(self.path, f"tensor {entry.name}") from None
                fd = files[entry.file]
                if pool is not None and entry.nbytes < 2 * MIN_BYTES_PER_THREAD:
                    job = pool.submit(self._read, entry, fd, tensor, aead, None)
                    window.append((entry, tensor, job))
                    if len(window) > 2 * self.threads:
                        yield self._finish(*window.popleft(), bar)
                    continue
                while window:
                    yield self._finish(*window.popleft(), bar)
                try:
                    self._read(entry, fd, tensor, aead, pool)
                except Exception:  # opaque on purpose, see the module docstring
                    tensor.zero_()
                    raise SealedModelError(self.path, f"tensor {entry.name}") from None
                bar.update(entry.nbytes)
                yield entry.name, _item(entry, tensor)
            while window:
                yield self._finish(*window.popleft(), bar)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)  # no thread writes into any tensor after this
            for _, unyielded, _ in window:  # decrypted (or half) but never handed out
                unyielded.zero_()
            wipe(self.chunk_key)
            for fd in files.values():
                os.close(fd)
            bar.close()

    def _finish(
        self, entry: fmt.TensorEntry, tensor: torch.Tensor, job: Future[None], bar: tqdm[Any]
    ) -> tuple[str, torch.Tensor | GgufQuantized]:
        """The windowed tensor once its job has authenticated every chunk; zeroed if not."""
        try:
            job.result()
        except Exception:  # opaque on purpose, see the module docstring
            tensor.zero_()
            raise SealedModelError(self.path, f"tensor {entry.name}") from None
        bar.update(entry.nbytes)
        return entry.name, _item(entry, tensor)

    def _read(
        self,
        entry: fmt.TensorEntry,
        fd: int,
        tensor: torch.Tensor,
        aead: AESGCM,
        pool: ThreadPoolExecutor | None,
    ) -> None:
        """Fill `tensor` from its stored bytes; raise on any short read, bad hash or bad tag.

        Sealed tensors are decrypted in contiguous runs of chunks, one run per thread (the AEAD
        and positional reads release the GIL). All runs finish before this returns or raises,
        so no thread writes into the tensor after the caller has zeroed it.
        """
        plain = tensor.reshape(-1).view(torch.uint8).numpy().data
        if entry.protection == fmt.PUBLIC:
            if os.preadv(fd, [plain], entry.offset) != entry.nbytes:
                raise ValueError("short read")
            if hashlib.sha256(plain).hexdigest() != entry.sha256:
                raise ValueError("hash")
            return
        runs = max(1, min(self.threads, entry.chunks * self.chunk_size // MIN_BYTES_PER_THREAD))
        per_run = -(-entry.chunks // runs)
        bounds = [(i, min(i + per_run, entry.chunks)) for i in range(0, entry.chunks, per_run)]
        if pool is None or len(bounds) == 1:
            for first, last in bounds:
                self._decrypt_run(entry, fd, plain, aead, first, last)
            return
        futures = [pool.submit(self._decrypt_run, entry, fd, plain, aead, *b) for b in bounds]
        wait(futures)
        for future in futures:
            future.result()  # re-raises the first failure, after every run has stopped

    def _decrypt_run(
        self,
        entry: fmt.TensorEntry,
        fd: int,
        plain: memoryview,
        aead: AESGCM,
        first: int,
        last: int,
    ) -> None:
        size = self.chunk_size
        buffer = bytearray(min(size, entry.nbytes) + fmt.CHUNK_OVERHEAD)  # ciphertext only
        for index in range(first, last):
            start = index * size
            stop = min(start + size, entry.nbytes)
            stored = memoryview(buffer)[: stop - start + fmt.CHUNK_OVERHEAD]
            offset = entry.offset + index * (size + fmt.CHUNK_OVERHEAD)
            if os.preadv(fd, [stored], offset) != len(stored):
                raise ValueError("short read")
            aad = fmt.chunk_aad(
                self.version,
                self.model_id,
                entry.name,
                entry.dtype,
                entry.shape,
                index,
                entry.chunks,
            )
            nonce = stored[: fmt.NONCE_BYTES]
            aead.decrypt_into(nonce, stored[fmt.NONCE_BYTES :], aad, plain[start:stop])


def _allocate(entry: fmt.TensorEntry, into: Destination | None) -> torch.Tensor:
    """The memory a row is decrypted into: `into`'s for a float tensor it names, else fresh (a
    GGUF block row: its bytes, flat)."""
    if entry.quantized:
        return torch.empty(entry.nbytes, dtype=torch.uint8)
    dtype = fmt.DTYPES[entry.dtype]
    target = into(entry.name, tuple(entry.shape), dtype) if into else None
    return target if target is not None else torch.empty(entry.shape, dtype=dtype)


def _item(entry: fmt.TensorEntry, tensor: torch.Tensor) -> torch.Tensor | GgufQuantized:
    """What a row is yielded as, once authenticated: a GGUF block row as `GgufQuantized` over
    its decrypted bytes (the manifest's type and shape were checked against its length)."""
    if not entry.quantized:
        return tensor
    rows, cols = entry.shape
    return GgufQuantized(entry.dtype, (rows, cols), tensor.numpy().reshape(rows, -1))
