"""Every change to a sealed directory is refused with one opaque SealedModelError.

One adversarial property per test; the bit-flip sweep and the hypothesis tests cover what the
hand-written structural cases do not.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdllm.model.checkpoint import Checkpoint
from tdllm.model.loader import load_model
from tdllm.model.transformer import Transformer
from tdllm.sealing.errors import SealedModelError
from tdllm.sealing.format import MANIFEST_NAME
from tdllm.sealing.reader import open_sealed
from tdllm.sealing.recipients import load_public_key
from tdllm_lab.sealing.writer import seal_checkpoint

from .sealed_dirs import (
    all_files,
    chunk_span,
    document,
    entry,
    read_chunk,
    write_chunk,
    write_document,
    xored,
)
from .synthetic import SMALL_CHUNK, Sealer, synthetic_checkpoint

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"  # 32x32 fp32: 4096 bytes, 16 chunks of 256
O_PROJ = "model.layers.0.self_attn.o_proj.weight"  # same size
K_PROJ = "model.layers.1.self_attn.k_proj.weight"  # 16x32: 2048 bytes
V_PROJ = "model.layers.1.self_attn.v_proj.weight"
LAST = "lm_head.weight"


def unseal_everything(folder: Path, key: Path | None = None, **kwargs: object) -> None:
    checkpoint = open_sealed(folder, key, **kwargs)  # type: ignore[arg-type]
    for _ in checkpoint.tensors():
        pass


@pytest.fixture
def sealed(seal_tiny: Sealer) -> Path:
    return seal_tiny(synthetic_checkpoint(seed=7), max_file_size=40_000)


def rejects(folder: Path, key: Path, what: str = "") -> SealedModelError:
    with pytest.raises(SealedModelError) as info:
        unseal_everything(folder, key)
    if what:
        assert info.value.what == what
    return info.value


# -- the sweep ----------------------------------------------------------------------------------


def test_rejects_a_thousand_single_bit_flips_across_data_files_and_manifest(
    seal_tiny: Sealer, recipient: tuple[Path, Path]
) -> None:
    folder = seal_tiny(
        synthetic_checkpoint(seed=11), max_file_size=40_000, public_patterns=["model.layers.1.*"]
    )
    unseal_everything(folder, recipient[1])  # intact, it opens
    rng = random.Random(20240603)  # noqa: S311 - a reproducible sweep, not a secret
    data = [p for p in all_files(folder) if p.name != MANIFEST_NAME]
    manifest = folder / MANIFEST_NAME
    assert len(data) >= 2
    targets = [(manifest, 300)] + [(p, 700 // len(data) + 1) for p in data]
    flips = 0
    for path, count in targets:
        size = path.stat().st_size
        for _ in range(count):
            offset, bit = rng.randrange(size), rng.randrange(8)
            with xored(path, offset, 1 << bit), pytest.raises(SealedModelError):
                unseal_everything(folder, recipient[1])
            flips += 1
    assert flips >= 1000
    unseal_everything(folder, recipient[1])  # every flip was undone


# -- structural mutations -----------------------------------------------------------------------


def test_rejects_reordered_chunks(sealed: Path, recipient: tuple[Path, Path]) -> None:
    first, second = read_chunk(sealed, Q_PROJ, 0), read_chunk(sealed, Q_PROJ, 1)
    write_chunk(sealed, Q_PROJ, 0, second)
    write_chunk(sealed, Q_PROJ, 1, first)
    rejects(sealed, recipient[1], f"tensor {Q_PROJ}")


def test_rejects_a_duplicated_chunk(sealed: Path, recipient: tuple[Path, Path]) -> None:
    write_chunk(sealed, Q_PROJ, 1, read_chunk(sealed, Q_PROJ, 0))
    rejects(sealed, recipient[1], f"tensor {Q_PROJ}")


def test_rejects_a_missing_chunk(sealed: Path, recipient: tuple[Path, Path]) -> None:
    path, offset, length = chunk_span(sealed, Q_PROJ, 2)
    raw = path.read_bytes()
    path.write_bytes(raw[:offset] + raw[offset + length :])
    rejects(sealed, recipient[1])


def test_rejects_a_missing_chunk_with_the_file_padded_back_to_size(
    sealed: Path, recipient: tuple[Path, Path]
) -> None:
    path, offset, length = chunk_span(sealed, Q_PROJ, 2)
    raw = path.read_bytes()
    path.write_bytes(raw[:offset] + raw[offset + length :] + bytes(length))
    rejects(sealed, recipient[1], f"tensor {Q_PROJ}")


@pytest.mark.parametrize("keep", [0, 1, 0.5, -1])
def test_rejects_a_truncated_data_file(
    sealed: Path, recipient: tuple[Path, Path], keep: float
) -> None:
    path = sealed / entry(sealed, Q_PROJ)["file"]
    raw = path.read_bytes()
    cut = int(len(raw) * keep) if isinstance(keep, float) else keep % len(raw)
    path.write_bytes(raw[:cut])
    rejects(sealed, recipient[1], "manifest")  # sizes are checked before anything is yielded


def test_rejects_a_data_file_with_bytes_appended(
    sealed: Path, recipient: tuple[Path, Path]
) -> None:
    path = sealed / entry(sealed, Q_PROJ)["file"]
    path.write_bytes(path.read_bytes() + b"\0")
    rejects(sealed, recipient[1], "manifest")


def test_rejects_a_truncated_manifest(sealed: Path, recipient: tuple[Path, Path]) -> None:
    path = sealed / MANIFEST_NAME
    path.write_bytes(path.read_bytes()[:-1])
    rejects(sealed, recipient[1], "manifest")


def test_rejects_a_missing_data_file(sealed: Path, recipient: tuple[Path, Path]) -> None:
    (sealed / entry(sealed, LAST)["file"]).unlink()
    rejects(sealed, recipient[1], "manifest")


def test_rejects_a_missing_manifest(sealed: Path, recipient: tuple[Path, Path]) -> None:
    (sealed / MANIFEST_NAME).unlink()
    rejects(sealed, recipient[1], "manifest")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (("name",), "another name"),
        (("key_id",), "model/other"),
        (("model_id",), "0" * 32),
        (("chunk_size",), SMALL_CHUNK * 2),
        (("config", "rope_theta"), 500000.0),
        (("config", "max_position_embeddings"), 4096),
        (("tokenizer", "eos_token_id"), 5),
        (("tokenizer", "chat_template"), "{{ messages }}"),
        (("tensors", 0, "shape"), [32, 64]),
        (("tensors", 1, "dtype"), "F16"),
        (("tensors", 2, "name"), "model.layers.0.input_layernorm.bias"),
        (("tensors", 3, "protection"), "public"),
        (("files", 0, "size"), 1),
    ],
)
def test_rejects_an_edited_manifest_field(
    sealed: Path, recipient: tuple[Path, Path], field: tuple[str | int, ...], value: object
) -> None:
    doc = document(sealed)
    target = doc["manifest"]
    for step in field[:-1]:
        target = target[step]
    assert target[field[-1]] != value
    target[field[-1]] = value
    write_document(sealed, doc)
    rejects(sealed, recipient[1], "manifest")


def test_rejects_reordered_manifest_tensor_rows(sealed: Path, recipient: tuple[Path, Path]) -> None:
    doc = document(sealed)
    rows = doc["manifest"]["tensors"]
    rows[0], rows[1] = rows[1], rows[0]
    write_document(sealed, doc)
    rejects(sealed, recipient[1], "manifest")


def test_rejects_a_chunk_swapped_between_tensors(
    sealed: Path, recipient: tuple[Path, Path]
) -> None:
    write_chunk(sealed, O_PROJ, 0, read_chunk(sealed, Q_PROJ, 0))
    rejects(sealed, recipient[1], f"tensor {O_PROJ}")


def test_rejects_whole_tensors_swapped_in_the_data_file(
    sealed: Path, recipient: tuple[Path, Path]
) -> None:
    k, v = entry(sealed, K_PROJ), entry(sealed, V_PROJ)
    assert k["file"] == v["file"] and k["length"] == v["length"]
    path = sealed / k["file"]
    raw = bytearray(path.read_bytes())
    k_bytes = bytes(raw[k["offset"] : k["offset"] + k["length"]])
    raw[k["offset"] : k["offset"] + k["length"]] = raw[v["offset"] : v["offset"] + v["length"]]
    raw[v["offset"] : v["offset"] + v["length"]] = k_bytes
    path.write_bytes(raw)
    rejects(sealed, recipient[1], f"tensor {K_PROJ}")


def test_rejects_a_chunk_from_another_model_sealed_with_the_same_key(seal_tiny: Sealer) -> None:
    key = os.urandom(32)
    source = synthetic_checkpoint(seed=8)
    ours, theirs = seal_tiny(source, data_key=key), seal_tiny(source, data_key=key)
    unseal_everything(ours, data_key=key)
    write_chunk(ours, Q_PROJ, 3, read_chunk(theirs, Q_PROJ, 3))
    with pytest.raises(SealedModelError, match="tensor"):
        unseal_everything(ours, data_key=key)


def test_rejects_a_data_file_from_another_model_sealed_with_the_same_key(
    seal_tiny: Sealer,
) -> None:
    key = os.urandom(32)
    source = synthetic_checkpoint(seed=8)
    ours, theirs = seal_tiny(source, data_key=key), seal_tiny(source, data_key=key)
    for path in theirs.glob("weights-*"):
        shutil.copyfile(path, ours / path.name)
    with pytest.raises(SealedModelError):
        unseal_everything(ours, data_key=key)


def test_rejects_a_recipient_entry_lifted_from_another_model(
    seal_tiny: Sealer, recipient: tuple[Path, Path]
) -> None:
    key = os.urandom(32)  # even when both models share the data key
    ours, theirs = seal_tiny(data_key=key), seal_tiny(data_key=key)
    public = load_public_key(recipient[0])
    for folder in (ours, theirs):  # give both a recipient entry for the same key
        shutil.rmtree(folder)
        seal_checkpoint(synthetic_checkpoint(), folder, [public], data_key=key)
    doc = document(ours)
    doc["recipients"] = document(theirs)["recipients"]
    write_document(ours, doc)
    rejects(ours, recipient[1], "manifest")


def test_rejects_a_model_other_than_the_pinned_model_id(
    sealed: Path, recipient: tuple[Path, Path]
) -> None:
    actual = document(sealed)["manifest"]["model_id"]
    unseal_everything(sealed, recipient[1], model_id=actual)
    with pytest.raises(SealedModelError, match="manifest"):
        open_sealed(sealed, recipient[1], model_id="f" * 32)


def test_rejects_a_key_that_is_not_a_recipient(sealed: Path, stranger: tuple[Path, Path]) -> None:
    rejects(sealed, stranger[1], "manifest")


def test_rejects_the_wrong_raw_data_key(seal_tiny: Sealer) -> None:
    folder = seal_tiny(data_key=os.urandom(32))
    with pytest.raises(SealedModelError, match="manifest"):
        open_sealed(folder, data_key=os.urandom(32))


def test_error_says_what_but_never_why(
    sealed: Path, recipient: tuple[Path, Path], stranger: tuple[Path, Path]
) -> None:
    wrong_key = str(rejects(sealed, stranger[1]))
    doc = document(sealed)
    doc["mac"] = "0" * 64
    write_document(sealed, doc)
    bad_mac = str(rejects(sealed, recipient[1]))
    assert wrong_key == bad_mac == f"{sealed}: cannot unseal manifest (wrong key, or damaged files)"


# -- nothing half-loaded ------------------------------------------------------------------------


def test_verifies_the_manifest_before_yielding_any_tensor(
    sealed: Path, recipient: tuple[Path, Path]
) -> None:
    doc = document(sealed)
    doc["manifest"]["name"] = "edited"
    write_document(sealed, doc)
    with pytest.raises(SealedModelError):
        open_sealed(sealed, recipient[1])  # fails at open: no checkpoint, no tensors()


def test_load_model_zeroes_a_partially_loaded_model_when_a_later_tensor_fails(
    sealed: Path, recipient: tuple[Path, Path], loaded_models: list[Transformer]
) -> None:
    path, offset, _ = chunk_span(sealed, LAST, 0)
    with xored(path, offset + 20, 0x01), pytest.raises(SealedModelError, match=LAST):
        load_model(open_sealed(sealed, recipient[1]))
    (model,) = loaded_models
    assert model.embed_tokens.weight.abs().sum() == 0  # it had been loaded, then scrubbed
    assert all(torch.count_nonzero(p) == 0 for p in model.parameters())


def test_zeroes_the_failed_tensor_and_streams_nothing_after_it(
    sealed: Path, recipient: tuple[Path, Path]
) -> None:
    path, offset, _ = chunk_span(sealed, Q_PROJ, 5)
    names: list[str] = []
    with xored(path, offset + 40, 0x80), pytest.raises(SealedModelError, match=Q_PROJ):
        for name, _ in open_sealed(sealed, recipient[1]).tensors():
            names.append(name)
    assert Q_PROJ not in names and names  # earlier tensors came through, the failed one never did


def test_zeroes_model_memory_it_was_decrypting_into_when_a_later_chunk_fails(
    sealed: Path, recipient: tuple[Path, Path]
) -> None:
    target = torch.full((32, 32), 7.0)  # Q_PROJ's shape: chunks 0-4 land here before chunk 5 fails
    path, offset, _ = chunk_span(sealed, Q_PROJ, 5)
    checkpoint = open_sealed(sealed, recipient[1])
    assert checkpoint.tensors_into is not None

    def into(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        return target if name == Q_PROJ else None

    with xored(path, offset + 40, 0x80), pytest.raises(SealedModelError, match=Q_PROJ):
        for _ in checkpoint.tensors_into(into):
            pass
    assert torch.count_nonzero(target) == 0


def test_a_sealed_checkpoint_streams_once(sealed: Path, recipient: tuple[Path, Path]) -> None:
    checkpoint: Checkpoint = open_sealed(sealed, recipient[1])
    list(checkpoint.tensors())
    with pytest.raises(Exception, match="once"):
        list(checkpoint.tensors())


# -- properties ---------------------------------------------------------------------------------

DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**16),
    dtype=DTYPES,
    chunk_size=st.integers(1, 5000),
    public=st.lists(st.sampled_from(["*norm*", "model.layers.0.*", "*k_proj*", "lm_head*"])),
)
def test_round_trip_is_exact_for_any_chunk_size_dtype_and_public_set(
    tmp_path: Path, seed: int, dtype: torch.dtype, chunk_size: int, public: list[str]
) -> None:
    key = os.urandom(32)
    source = synthetic_checkpoint(seed=seed, dtype=dtype)
    folder = tmp_path / f"m{seed}-{chunk_size}-{len(public)}-{str(dtype)[6:]}"
    seal_checkpoint(source, folder, data_key=key, chunk_size=chunk_size, public_patterns=public)
    try:
        got = dict(open_sealed(folder, data_key=key).tensors())
        want = dict(source.tensors())
        assert list(got) == list(want)
        assert all(torch.equal(got[n], want[n]) and got[n].dtype == dtype for n in want)
    finally:
        shutil.rmtree(folder)


@pytest.fixture(scope="module")
def sealed_once(tmp_path_factory: pytest.TempPathFactory, recipient: tuple[Path, Path]) -> Path:
    folder = tmp_path_factory.mktemp("hypothesis") / "sealed"
    seal_checkpoint(
        synthetic_checkpoint(seed=9),
        folder,
        [load_public_key(recipient[0])],
        chunk_size=1024,
        max_file_size=50_000,
        public_patterns=["*norm*"],
    )
    return folder


@settings(max_examples=200, deadline=None)
@given(where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_rejects_any_single_byte_mutation(
    sealed_once: Path, recipient: tuple[Path, Path], where: float, mask: int
) -> None:
    files = all_files(sealed_once)
    sizes = [p.stat().st_size for p in files]
    position = int(where * sum(sizes))
    index = 0
    while position >= sizes[index]:
        position -= sizes[index]
        index += 1
    with xored(files[index], position, mask), pytest.raises(SealedModelError):
        unseal_everything(sealed_once, recipient[1])


# -- key hygiene --------------------------------------------------------------------------------


def test_wipes_the_chunk_key_when_the_stream_ends(
    sealed: Path, recipient: tuple[Path, Path]
) -> None:
    checkpoint = open_sealed(sealed, recipient[1])
    source = checkpoint.tensors.__self__  # type: ignore[attr-defined]
    assert any(source.chunk_key)
    stream = checkpoint.tensors()
    next(stream)
    stream.close()  # abandoned half way, as a failed load would
    assert not any(source.chunk_key)


# -- parallel decryption ------------------------------------------------------------------------


def big_checkpoint() -> Checkpoint:
    """One 9 MiB tensor: large enough that its chunks are decrypted by several threads."""
    tiny = synthetic_checkpoint()
    big = torch.randn(2304, 1024, generator=torch.Generator().manual_seed(3))
    return Checkpoint("big", tiny.path, tiny.config, tiny.tokenizer, lambda: iter([("big", big)]))


def test_parallel_decryption_round_trips_and_rejects_a_flip_in_any_run(tmp_path: Path) -> None:
    key = os.urandom(32)
    folder = tmp_path / "big"
    seal_checkpoint(big_checkpoint(), folder, data_key=key, chunk_size=64 << 10)
    ((_, want),) = big_checkpoint().tensors()
    for threads in (1, 2, 3):
        ((_, got),) = open_sealed(folder, data_key=key, threads=threads).tensors()
        assert torch.equal(got, want)
    data = folder / "weights-00000.sealed"
    for where in (100, data.stat().st_size // 2, data.stat().st_size - 5):
        with xored(data, where, 0x04), pytest.raises(SealedModelError, match="tensor big"):
            list(open_sealed(folder, data_key=key, threads=3).tensors())
