"""The sealed model format: names, the manifest schema, key derivation and chunk AAD.

Version 1 stores float tensors only; version 2 (`FORMAT_QUANTIZED`) adds rows that hold GGUF
quantized blocks as they are (`QUANTIZED`), and is written only by a seal that has such rows, so
every other seal stays readable by a version-1 reader (which refuses a version-2 document).

Everything both the writer and the reader must agree on byte for byte lives here, so the format
has one definition (docs/sealed-format.md describes the same thing in prose). The AEAD, nonce
and chunk details stay inside the sealing package; callers see `seal_checkpoint` and
`open_sealed` with one opaque error (the Fernet recipe-over-primitives shape).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tdllm_attest.model_identity import valid_model_name, valid_model_version
from tdllm_attest.wire import canonical_json as canonical_json  # MAC/AAD bytes: fmt.canonical_json

FORMAT = "tdllm-sealed/1"
FORMAT_QUANTIZED = "tdllm-sealed/2"  # some rows hold GGUF blocks (`QUANTIZED`)
FORMATS = (FORMAT, FORMAT_QUANTIZED)
KDF_LABEL = FORMAT  # the HKDF info prefix in every version: the keys do not depend on it
MANIFEST_NAME = "sealed-model.json"
DATA_FILE_PATTERN = "weights-{:05d}.sealed"
CIPHER = "AES-256-GCM"
DATA_KEY_BYTES = 32
NONCE_BYTES = 12  # 96-bit random nonce, stored in front of every chunk
TAG_BYTES = 16
CHUNK_OVERHEAD = NONCE_BYTES + TAG_BYTES
DEFAULT_CHUNK_SIZE = 1 << 20  # plaintext bytes per chunk
DEFAULT_MAX_FILE_SIZE = 4 << 30  # a new data file starts before a tensor that would cross this
MAX_MANIFEST_BYTES = 256 << 20  # refuse to parse anything bigger (a tokenizer.json is a few MB)
DEFAULT_MODEL_VERSION = 1
MAX_DIMENSIONS = 8  # axes of a stored tensor
MAX_DIMENSION = 1 << 32  # elements along one axis

SEALED = "sealed"
PUBLIC = "public"

# Stored dtypes use safetensors' names; the bytes are little-endian, as torch holds them on x86.
DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Version 2 only: GGUF block types stored as their raw blocks, by ggml's type name, with their
# (weights per block, bytes per block); a row's shape is the logical [rows, cols] (PyTorch
# order) and its bytes are rows * cols / block * bytes_per_block (`GgufQuantized.blocks`).
QUANTIZED: dict[str, tuple[int, int]] = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}


def derive_key(data_key: bytes | bytearray, model_id: str, purpose: str) -> bytearray:
    """HKDF-SHA256 subkey of the model's data key, salted with the model id.

    Separate subkeys for chunks and the manifest MAC keep the two uses apart; the model-id salt
    means two models sealed under one data key (a broker may reuse one) still get different
    chunk keys, so a chunk from one can never authenticate in the other.
    """
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=bytes.fromhex(model_id),
        info=f"{KDF_LABEL} {purpose}".encode(),
    )
    return bytearray(hkdf.derive(bytes(data_key)))


CHUNK_KEY = "chunk key"
MAC_KEY = "manifest mac"


def chunk_aad(
    version: str, model_id: str, name: str, dtype: str, shape: list[int], index: int, count: int
) -> bytes:
    """Associated data of one chunk: binds it to its format version, model, tensor, type, shape
    and position. For a quantized row the type (GGUF block type) and logical shape are all its
    quantization parameters (the block geometry follows from the type): relabelling Q4_0 bytes
    as Q4_1, or reshaping them, fails the tag even past a forged manifest MAC."""
    return canonical_json(
        {
            "chunk": index,
            "chunks": count,
            "dtype": dtype,
            "format": version,
            "model_id": model_id,
            "shape": shape,
            "tensor": name,
        }
    )


@dataclass(frozen=True)
class ModelVersion:
    """The owner's model name and monotonic version, as a sealed manifest states them (under
    its MAC) and as the key broker releases a key for them (tdllm_attest.model_identity)."""

    model: str
    version: int

    def __post_init__(self) -> None:
        if not valid_model_name(self.model) or not valid_model_version(self.version):
            raise ValueError("a model name is 1..200 printable characters, a version 1..2**53-1")

    def __str__(self) -> str:
        return f"model {self.model!r} version {self.version}"


def manifest_model_version(manifest: dict[str, Any]) -> ModelVersion | None:
    """The model and version of a manifest; None for one sealed before manifests had them.

    Read it from an authenticated manifest only (after the MAC check).
    """
    if "model" not in manifest and "version" not in manifest:
        return None
    return ModelVersion(manifest["model"], manifest["version"])


def manifest_identity(manifest: dict[str, Any]) -> dict[str, str]:
    """What /v1/attestation binds of a sealed model: format, model id and the digest of the
    manifest whose MAC was verified (the caller passes only an authenticated one)."""
    return {
        "format": str(manifest["format"]),
        "manifest_sha256": hashlib.sha256(canonical_json(manifest)).hexdigest(),
        "model_id": str(manifest["model_id"]),
    }


def chunk_count(nbytes: int, chunk_size: int) -> int:
    """Chunks of a tensor of `nbytes`; an empty tensor still gets one (authenticated) chunk."""
    return max(1, math.ceil(nbytes / chunk_size))


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's row of the manifest."""

    name: str
    dtype: str
    shape: list[int]
    protection: str  # SEALED or PUBLIC
    file: str
    offset: int
    length: int  # stored bytes (chunks with nonces and tags, or the raw public bytes)
    chunks: int
    sha256: str | None  # public tensors only: hex digest of the raw bytes

    @property
    def quantized(self) -> bool:
        """Whether the row holds GGUF blocks (`QUANTIZED`), not a float tensor."""
        return self.dtype in QUANTIZED

    @property
    def nbytes(self) -> int:
        """Plaintext size."""
        if self.quantized:
            block, block_bytes = QUANTIZED[self.dtype]
            return math.prod(self.shape) // block * block_bytes
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": self.shape,
            "protection": self.protection,
            "file": self.file,
            "offset": self.offset,
            "length": self.length,
            "chunks": self.chunks,
        }
        if self.sha256 is not None:
            row["sha256"] = self.sha256
        return row

    @classmethod
    def from_json(
        cls, row: dict[str, Any], chunk_size: int, quantized: bool = False
    ) -> TensorEntry:
        """Parse and check one row; raises ValueError/KeyError/TypeError on anything odd.
        `quantized`: whether the manifest's version allows GGUF block rows."""
        entry = cls(
            name=_str(row["name"]),
            dtype=_str(row["dtype"]),
            shape=[_int(d) for d in row["shape"]],
            protection=_str(row["protection"]),
            file=_str(row["file"]),
            offset=_int(row["offset"]),
            length=_int(row["length"]),
            chunks=_int(row["chunks"]),
            sha256=_str(row["sha256"]) if "sha256" in row else None,
        )
        known = entry.dtype in DTYPES or (quantized and entry.quantized)
        if not known or entry.protection not in (SEALED, PUBLIC):
            raise ValueError("unknown dtype or protection")
        if entry.quantized and not _whole_blocks(entry.shape, QUANTIZED[entry.dtype][0]):
            raise ValueError("quantized shape")
        # an empty tensor passes the size checks whatever its other dimensions; torch refuses
        # (TypeError) a dimension past int64, and no real tensor has one past 2**32 or 8 axes
        if len(entry.shape) > MAX_DIMENSIONS or any(d > MAX_DIMENSION for d in entry.shape):
            raise ValueError("tensor shape out of range")
        if entry.protection == SEALED:
            expected_chunks = chunk_count(entry.nbytes, chunk_size)
            expected_length = entry.nbytes + expected_chunks * CHUNK_OVERHEAD
            ok = entry.chunks == expected_chunks and entry.sha256 is None
        else:
            expected_length = entry.nbytes
            ok = entry.chunks == 0 and entry.sha256 is not None and len(entry.sha256) == 64
        if not ok or entry.length != expected_length or entry.offset < 0:
            raise ValueError("inconsistent tensor entry")
        return entry


def _whole_blocks(shape: list[int], block: int) -> bool:
    """A quantized row is a non-empty [rows, cols] matrix of whole blocks per row."""
    return len(shape) == 2 and shape[0] > 0 and shape[1] > 0 and shape[1] % block == 0


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError("expected a non-negative integer")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value
