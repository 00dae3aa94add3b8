"""Sealing that keeps GGUF-quantized weights quantized (`tdllm seal --keep-quantized`, format
version 2): the blocks round-trip byte for byte, the host cannot relabel, reshape, swap or cut
them (the chunk AAD binds type and shape even past a forged manifest MAC), a version-1 reader
refuses them, no plaintext block reaches the disk, and the bundled model sealed this way is
under half the bf16 seal and loads to the very kernels plain GGUF loading makes."""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from cryptography.hazmat.primitives import hashes, hmac
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize

from tdllm.errors import UsageError
from tdllm.model import avx512_kernel
from tdllm.model.block_embedding import BlockEmbedding
from tdllm.model.checkpoint import Checkpoint, GgufTensors
from tdllm.model.cpu_features import HAS_VNNI
from tdllm.model.gguf_blocks import GgufQuantized
from tdllm.model.head_embedding import HeadEmbedding
from tdllm.model.int8_methods import Int8GroupAvx2Method, int8_weights
from tdllm.model.loader import load_model
from tdllm.model.quantized import quant_table
from tdllm.model.transformer import Batch, KVCache, Transformer
from tdllm.sealing import format as fmt
from tdllm.sealing.errors import SealedModelError
from tdllm.sealing.reader import open_sealed
from tdllm.sources import open_checkpoint
from tdllm_lab.sealing.commands import seal
from tdllm_lab.sealing.writer import seal_checkpoint
from tests.cpu_kernels import needs_avx2, needs_avx512, needs_vnni

from .sealed_dirs import (
    all_files,
    document,
    read_chunk,
    write_chunk,
    write_document,
    xored,
)
from .synthetic import SMALL_CHUNK, synthetic_checkpoint
from .test_no_plaintext import windows

# Same stored size (64 * 180 bytes), so relabelling one as the other keeps every length right:
# only the chunk AAD can tell them apart once the manifest MAC is forged.
A = "a.weight"  # Q4_1 [64, 288]
B = "b.weight"  # Q4_0 [64, 320]
C = "c.weight"  # Q8_0 [16, 64]
NORM = "norm.weight"  # a float tensor in between


def blocks(kind: str, rows: int, cols: int, seed: int) -> GgufQuantized:
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    return GgufQuantized(kind, (rows, cols), quantize(weight, GGMLQuantizationType[kind]))


class _Blocks(GgufTensors):
    """A GGUF-like source without a file: its `with_blocks` is a fixed set of tensors."""

    def __init__(self, items: dict[str, torch.Tensor | GgufQuantized]) -> None:
        self.items = items

    def with_blocks(self) -> Iterator[tuple[str, torch.Tensor | GgufQuantized]]:
        yield from self.items.items()


def quantized_source() -> tuple[Checkpoint, dict[str, Any]]:
    items: dict[str, Any] = {
        A: blocks("Q4_1", 64, 288, 1),
        NORM: torch.linspace(-1, 1, 32),
        B: blocks("Q4_0", 64, 320, 2),
        C: blocks("Q8_0", 16, 64, 3),
    }
    base = synthetic_checkpoint(seed=3)
    return dataclasses.replace(base, tensors=_Blocks(items)), items


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def sealed(tmp_path: Path, key: bytes) -> Path:
    out = tmp_path / "q.sealed"
    source, _ = quantized_source()
    seal_checkpoint(source, out, data_key=key, chunk_size=SMALL_CHUNK, keep_quantized=True)
    return out


def unseal(folder: Path, key: bytes) -> dict[str, Any]:
    checkpoint = open_sealed(folder, data_key=key)
    assert checkpoint.tensors_into is not None
    return dict(checkpoint.tensors_into(lambda name, shape, dtype: None))


def remac(folder: Path, key: bytes, edit: Any) -> None:
    """Apply `edit` to the manifest and sign it again, as only a data-key holder could: what is
    left to stop the change is the chunk AAD."""
    doc = document(folder)
    edit(doc["manifest"])
    mac = hmac.HMAC(fmt.derive_key(key, doc["manifest"]["model_id"], fmt.MAC_KEY), hashes.SHA256())
    mac.update(fmt.canonical_json(doc["manifest"]))
    doc["mac"] = mac.finalize().hex()
    write_document(folder, doc)


def row(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in manifest["tensors"] if r["name"] == name)


def rejects(folder: Path, key: bytes, what: str) -> None:
    with pytest.raises(SealedModelError) as info:
        unseal(folder, key)
    assert info.value.what == what
    assert str(info.value).endswith("(wrong key, or damaged files)")  # the same line for any cause


# -- format and round trip ----------------------------------------------------------------------


def test_the_format_table_has_ggufs_block_geometry() -> None:
    for kind, geometry in fmt.QUANTIZED.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[kind]] == geometry, kind


def test_a_quantized_seal_is_version_2_and_yields_the_very_blocks(sealed: Path, key: bytes) -> None:
    _, items = quantized_source()
    doc = document(sealed)
    assert doc["format"] == doc["manifest"]["format"] == fmt.FORMAT_QUANTIZED
    rows = {r["name"]: r for r in doc["manifest"]["tensors"]}
    assert (rows[A]["dtype"], rows[A]["shape"]) == ("Q4_1", [64, 288])
    assert (rows[C]["dtype"], rows[C]["shape"], rows[NORM]["dtype"]) == ("Q8_0", [16, 64], "F32")
    got = unseal(sealed, key)
    for name in (A, B, C):
        assert isinstance(got[name], GgufQuantized)
        assert (got[name].kind, got[name].shape) == (items[name].kind, items[name].shape)
        assert np.array_equal(got[name].blocks, items[name].blocks), name
    assert torch.equal(got[NORM], items[NORM])
    # consumers of plain floats get them dequantized
    floats = dict(open_sealed(sealed, data_key=key).tensors())
    assert torch.equal(floats[A], items[A].dequantize())


def test_keep_quantized_refuses_a_source_without_gguf_blocks(tmp_path: Path, key: bytes) -> None:
    with pytest.raises(UsageError, match="--keep-quantized takes a GGUF source"):
        seal_checkpoint(synthetic_checkpoint(), tmp_path / "x", data_key=key, keep_quantized=True)
    assert not (tmp_path / "x").exists()


def test_a_float_seal_stays_version_1(tmp_path: Path, key: bytes) -> None:
    seal_checkpoint(synthetic_checkpoint(), tmp_path / "f", data_key=key)
    assert document(tmp_path / "f")["format"] == fmt.FORMAT


# -- attacks ------------------------------------------------------------------------------------


def test_rejects_a_dtype_relabelled_in_the_manifest(sealed: Path, key: bytes) -> None:
    doc = document(sealed)
    row(doc["manifest"], A).update(dtype="Q4_0", shape=[64, 320])  # same length, MAC not forged
    write_document(sealed, doc)
    rejects(sealed, key, "manifest")


def test_rejects_a_relabelled_block_type_even_with_a_forged_mac(sealed: Path, key: bytes) -> None:
    remac(sealed, key, lambda m: row(m, A).update(dtype="Q4_0", shape=[64, 320]))
    rejects(sealed, key, f"tensor {A}")


def test_rejects_a_changed_shape_even_with_a_forged_mac(sealed: Path, key: bytes) -> None:
    remac(sealed, key, lambda m: row(m, A).update(shape=[32, 576]))  # same blocks, other rows
    rejects(sealed, key, f"tensor {A}")


def test_rejects_blocks_relabelled_as_floats_even_with_a_forged_mac(
    sealed: Path, key: bytes
) -> None:
    remac(sealed, key, lambda m: row(m, A).update(dtype="F16", shape=[64, 90]))  # 11520 bytes
    rejects(sealed, key, f"tensor {A}")


def test_rejects_two_quantized_tensors_swapped_in_the_table_even_with_a_forged_mac(
    sealed: Path, key: bytes
) -> None:
    def swap(manifest: dict[str, Any]) -> None:
        a, b = row(manifest, A), row(manifest, B)
        a["offset"], b["offset"] = b["offset"], a["offset"]

    remac(sealed, key, swap)
    rejects(sealed, key, f"tensor {A}")


def test_rejects_chunks_swapped_between_two_quantized_tensors(sealed: Path, key: bytes) -> None:
    first, second = read_chunk(sealed, A, 0), read_chunk(sealed, B, 0)
    write_chunk(sealed, A, 0, second)
    write_chunk(sealed, B, 0, first)
    rejects(sealed, key, f"tensor {A}")


def test_rejects_a_truncated_data_file(sealed: Path, key: bytes) -> None:
    data = next(p for p in all_files(sealed) if p.name != fmt.MANIFEST_NAME)
    data.write_bytes(data.read_bytes()[:-1])
    rejects(sealed, key, "manifest")


def test_rejects_a_quantized_tensor_cut_to_fewer_rows_even_with_a_forged_mac(
    sealed: Path, key: bytes
) -> None:
    def cut(manifest: dict[str, Any]) -> None:  # its first 32 rows, every length consistent
        r = row(manifest, A)
        nbytes = 32 * 288 // 32 * 20
        chunks = fmt.chunk_count(nbytes, SMALL_CHUNK)
        r.update(shape=[32, 288], chunks=chunks, length=nbytes + chunks * fmt.CHUNK_OVERHEAD)

    remac(sealed, key, cut)
    rejects(sealed, key, f"tensor {A}")


def test_a_version_1_reader_refuses_a_quantized_seal(
    sealed: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fmt, "FORMATS", (fmt.FORMAT,))  # what a reader from before version 2 knows
    rejects(sealed, key, "manifest")


def test_rejects_quantized_rows_in_a_manifest_labelled_version_1(sealed: Path, key: bytes) -> None:
    remac(sealed, key, lambda m: m.update(format=fmt.FORMAT))
    doc = document(sealed)
    doc["format"] = fmt.FORMAT
    write_document(sealed, doc)
    rejects(sealed, key, "manifest")


def test_rejects_a_document_whose_format_is_not_its_manifests(sealed: Path, key: bytes) -> None:
    doc = document(sealed)
    doc["format"] = fmt.FORMAT
    write_document(sealed, doc)
    rejects(sealed, key, "manifest")


def test_no_window_of_any_quantized_tensor_appears_in_any_file(sealed: Path, key: bytes) -> None:
    _, items = quantized_source()
    rng = random.Random(7)  # noqa: S311 - reproducible offsets, not a secret
    disk = [p.read_bytes() for p in all_files(sealed)]
    for name in (A, B, C):
        raw = items[name].blocks.tobytes()
        assert not any(w in blob for w in windows(raw, rng) for blob in disk), name
    assert not any(key in blob for blob in disk), "the data key is on disk"


# -- the bundled model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_seals(
    tmp_path_factory: pytest.TempPathFactory, recipient: tuple[Path, Path]
) -> dict[str, Path]:
    """The bundled Q4_1 GGUF sealed with `tdllm seal --keep-quantized`, and in bf16."""
    folder = tmp_path_factory.mktemp("bundled")
    runner = CliRunner()
    for name, extra in (("quantized", ["--keep-quantized"]), ("bf16", ["--dtype", "bf16"])):
        args = ["bundled", "--out", str(folder / name), "--recipient", str(recipient[0]), *extra]
        result = runner.invoke(seal, args)
        assert result.exit_code == 0, result.output
    return {"quantized": folder / "quantized", "bf16": folder / "bf16"}


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in all_files(folder))


def test_the_bundled_quantized_seal_is_under_half_the_bf16_seal(
    bundled_seals: dict[str, Path], record_property: Any
) -> None:
    quantized, bf16 = size(bundled_seals["quantized"]), size(bundled_seals["bf16"])
    record_property("sealed_bytes", {"quantized": quantized, "bf16": bf16})
    print(f"bundled sealed: quantized {quantized / 1e6:.1f} MB, bf16 {bf16 / 1e6:.1f} MB")
    assert quantized < 0.5 * bf16
    rows = document(bundled_seals["quantized"])["manifest"]["tensors"]
    assert {r["dtype"] for r in rows} == {"Q4_1", "Q8_0", "F32"}


def greedy(model: Transformer, prompt: list[int], steps: int = 8) -> list[int]:
    cache = KVCache(model.cfg, 1, len(prompt) + steps, torch.float32)
    logits = model(torch.tensor([prompt]), Batch([0], [0], len(prompt)), cache)
    out = [int(logits[0, -1].argmax())]
    for step in range(steps - 1):
        batch = Batch([0], [len(prompt) + step], 1)
        out.append(int(model(torch.tensor([[out[-1]]]), batch, cache)[0, -1].argmax()))
    return out


def same_weights(a: Transformer, b: Transformer) -> bool:
    theirs = dict(b.state_dict(keep_vars=True))
    ours = dict(a.state_dict(keep_vars=True))
    return ours.keys() == theirs.keys() and all(torch.equal(t, theirs[n]) for n, t in ours.items())


@pytest.mark.parametrize(
    "quant",
    [
        "int4",
        pytest.param("w4a8", marks=needs_avx2),
        pytest.param("w4a8-avx512", marks=needs_avx512),
        "int8",
        pytest.param("w8a8-avx2", marks=needs_avx2),
        pytest.param("w8a8", marks=needs_vnni),
        "none",
    ],
)
def test_the_quantized_seal_loads_bit_identical_to_the_plain_gguf(
    bundled_seals: dict[str, Path], recipient: tuple[Path, Path], quant: str
) -> None:
    methods = quant_table(quant) if quant != "none" else None
    plain, checkpoint = load_model(open_checkpoint("bundled"), torch.float32, methods)
    opened = open_checkpoint(bundled_seals["quantized"], key=recipient[1])
    sealed, _ = load_model(opened, torch.float32, methods)
    # the same blocks reach the same packing: int4/int8 codes, scales and zeros bit for bit;
    # with no quantization, every weight is gguf's dequantized float
    assert same_weights(sealed, plain)
    for name, module in plain.named_modules():  # the kernels' buffers (not in the state dict)
        for buffer in ("qweight", "scales", "scales_zeros"):
            if isinstance(theirs := getattr(module, buffer, None), torch.Tensor):
                assert torch.equal(getattr(sealed.get_submodule(name), buffer), theirs), name
    if isinstance(plain.lm_head.method, Int8GroupAvx2Method):  # holds the Q8_0 table exactly
        # the embedding reads the head's rows (its qweight compared above), no table of its own
        assert isinstance(sealed.embed_tokens, HeadEmbedding)
        assert isinstance(plain.embed_tokens, HeadEmbedding)
    elif quant != "none":  # the Q8_0 embedding kept as its blocks (not in the state dict)
        assert isinstance(sealed.embed_tokens, BlockEmbedding)
        assert isinstance(plain.embed_tokens, BlockEmbedding)
        assert torch.equal(sealed.embed_tokens.blocks, plain.embed_tokens.blocks)
    # W8A8 projections (int4's head too): FBGEMM's packing holds them, not the state dict
    packed = [n for n, m in plain.named_modules() if "w8a8_handle" in m.__dict__]
    if quant == "w8a8":  # every projection but q|k|v
        assert len(packed) == 3 * plain.cfg.num_layers + 1
    else:  # int4's head is W8A8 where the CPU has VNNI, w4a8's where it has AVX-512 VNNI
        w8a8_head = (quant == "int4" and HAS_VNNI) or quant == "w4a8-avx512"
        w8a8_head |= quant == "w4a8" and not avx512_kernel.missing_cpu_flags()
        assert packed == (["lm_head"] if w8a8_head else [])
    for name in packed:
        ours, theirs = sealed.get_submodule(name), plain.get_submodule(name)
        assert all(map(torch.equal, int8_weights(ours), int8_weights(theirs))), name
    if "4" in quant:
        prompt = checkpoint.tokenizer.encode("The capital of France is")
        assert greedy(sealed, prompt) == greedy(plain, prompt)


def test_a_failed_quantized_load_scrubs_the_embeddings_decrypted_blocks(
    bundled_seals: dict[str, Path], recipient: tuple[Path, Path], loaded_models: list[Transformer]
) -> None:
    # the block embedding keeps the sealed reader's decrypted buffer as it is: when a later
    # tensor fails to authenticate, the loader's scrub must reach it like any weight
    folder = bundled_seals["quantized"]
    last = document(folder)["manifest"]["tensors"][-1]  # the embedding is the first
    path, offset = folder / last["file"], last["offset"]
    with xored(path, offset + 20, 0x01), pytest.raises(SealedModelError):
        load_model(open_checkpoint(folder, key=recipient[1]), torch.float32, quant_table("int8"))
    (model,) = loaded_models
    assert isinstance(model.embed_tokens, BlockEmbedding)  # it had been loaded
    assert model.embed_tokens.blocks.numel() > 0
    assert torch.count_nonzero(model.embed_tokens.blocks) == 0  # then scrubbed


@pytest.mark.slow  # six fresh interpreter processes
def test_the_sealed_load_bench_compares_the_float_and_the_block_seal(tmp_path: Path) -> None:
    from tdllm_lab.bench.shape_sealed import sealed_load
    from tdllm_lab.bench.synthetic_shapes import Shape, ensure_gguf

    tiny = Shape("tiny", hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, vocab=320, tied=True)
    f16 = ensure_gguf("tiny", "f16", tmp_path, shape=tiny, progress=False)
    q4_0 = ensure_gguf("tiny", "q4_0", tmp_path, shape=tiny, progress=False)
    load = sealed_load(f16, lambda _: None, repeats=1, tmp_root=tmp_path, quantized=(q4_0, "int4"))
    q = load["quantized"]
    assert q["quant"] == "int4" and q["floats_s"] > 0 and q["blocks_s"] > 0
    assert q["blocks_bytes"] < q["floats_bytes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f16.name, q4_0.name])
