"""A sealed model opens to exactly the tensors, config and tokenizer it was sealed from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.model.int8_methods import Int8WeightOnlyMethod
from tdllm.model.linear import LinearMethodTable
from tdllm.model.loader import load_model
from tdllm.sealing.format import MANIFEST_NAME
from tdllm.sealing.reader import open_sealed
from tdllm.sealing.recipients import load_public_key, write_key_pair
from tdllm.sources import open_checkpoint
from tdllm_lab.sealing.writer import seal_checkpoint

from .synthetic import TINY, Sealer, synthetic_checkpoint, tensors_of


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def test_opens_to_identical_tensors_config_and_tokenizer(
    seal_tiny: Sealer, recipient: tuple[Path, Path]
) -> None:
    source = synthetic_checkpoint(seed=1)
    opened = open_sealed(seal_tiny(source), recipient[1])
    assert opened.config == TINY
    assert opened.name == "tiny"
    assert opened.tokenizer.encode("Hello, sealed world!") == source.tokenizer.encode(
        "Hello, sealed world!"
    )
    assert (opened.tokenizer.bos_token_id, opened.tokenizer.eos_token_id) == (0, 1)
    assert_same_tensors(tensors_of(source), tensors_of(opened))


def test_decrypts_straight_into_the_memory_the_loader_names(
    seal_tiny: Sealer, recipient: tuple[Path, Path]
) -> None:
    source = tensors_of(synthetic_checkpoint(seed=2))
    targets = {
        name: torch.empty_like(t) for name, t in source.items() if name.endswith("proj.weight")
    }
    opened = open_sealed(seal_tiny(synthetic_checkpoint(seed=2)), recipient[1])
    assert opened.tensors_into is not None
    streamed = dict(opened.tensors_into(lambda name, shape, dtype: targets.get(name)))
    assert_same_tensors(source, streamed)
    for name, target in targets.items():  # no temporary: the yielded tensor is that memory
        assert streamed[name].data_ptr() == target.data_ptr()


def test_keeps_the_source_dtype_by_default_and_converts_on_request(seal_tiny: Sealer) -> None:
    key = os.urandom(32)
    bf16_source = synthetic_checkpoint(dtype=torch.bfloat16)
    same = tensors_of(open_sealed(seal_tiny(bf16_source, data_key=key), data_key=key))
    assert_same_tensors(tensors_of(bf16_source), same)
    fp32_source = synthetic_checkpoint()
    folder = seal_tiny(fp32_source, data_key=key, dtype=torch.bfloat16)
    halved = tensors_of(open_sealed(folder, data_key=key))
    expected = {n: t.to(torch.bfloat16) for n, t in tensors_of(fp32_source).items()}
    assert_same_tensors(expected, halved)


def test_stores_public_tensors_in_the_clear_and_seal_patterns_win(seal_tiny: Sealer) -> None:
    key = os.urandom(32)
    source = synthetic_checkpoint()
    folder = seal_tiny(
        source,
        data_key=key,
        public_patterns=["model.layers.0.*", "model.embed_tokens.weight"],
        seal_patterns=["*.mlp.*"],
    )
    rows = {
        r["name"]: r
        for r in json.loads((folder / MANIFEST_NAME).read_text())["manifest"]["tensors"]
    }
    public = {n for n, r in rows.items() if r["protection"] == "public"}
    assert public == {
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
    }
    data = b"".join(p.read_bytes() for p in sorted(folder.glob("weights-*")))
    embed = tensors_of(source)["model.embed_tokens.weight"]
    assert embed.numpy().tobytes() in data  # public really means readable without the key
    assert_same_tensors(tensors_of(source), tensors_of(open_sealed(folder, data_key=key)))


def test_every_recipient_opens_the_model_including_p384(tmp_path: Path, seal_tiny: Sealer) -> None:
    x_pub, x_key = write_key_pair(tmp_path / "x", "X25519")
    p_pub, p_key = write_key_pair(tmp_path / "p", "P-384")
    source = synthetic_checkpoint(seed=3)
    folder = seal_tiny(source, recipients=[load_public_key(x_pub), load_public_key(p_pub)])
    for key in (x_key, p_key):
        assert_same_tensors(tensors_of(source), tensors_of(open_sealed(folder, key)))


def test_splits_data_across_files_and_reads_them_back(seal_tiny: Sealer) -> None:
    key = os.urandom(32)
    source = synthetic_checkpoint(seed=4)
    folder = seal_tiny(source, data_key=key, max_file_size=20_000)
    assert len(list(folder.glob("weights-*.sealed"))) > 2
    assert_same_tensors(tensors_of(source), tensors_of(open_sealed(folder, data_key=key)))


def test_open_checkpoint_loads_a_sealed_directory_like_a_plain_one(
    seal_tiny: Sealer, recipient: tuple[Path, Path]
) -> None:
    source = synthetic_checkpoint(seed=5)
    model, checkpoint = load_model(open_checkpoint(seal_tiny(source), key=recipient[1]))
    plain, _ = load_model(source)
    assert checkpoint.config == TINY
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sealed_model_loads_int8_quantized_like_a_plain_one(
    seal_tiny: Sealer, recipient: tuple[Path, Path], dtype: torch.dtype
) -> None:
    # the reader decrypts into the embedding and norms only; the quantized projections take
    # their plaintext through load_weight (Transformer.weight_destinations)
    source = synthetic_checkpoint(seed=6)
    models = [
        load_model(checkpoint, dtype, LinearMethodTable(default=Int8WeightOnlyMethod()))[0]
        for checkpoint in (open_checkpoint(seal_tiny(source), key=recipient[1]), source)
    ]
    buffers = [dict(m.named_buffers()) for m in models]
    assert any(t.dtype == torch.int8 for t in buffers[0].values())
    assert list(buffers[0]) == list(buffers[1])
    for name, tensor in buffers[0].items():
        assert torch.equal(tensor, buffers[1][name]), name
    for (name, a), b in zip(
        models[0].state_dict().items(), models[1].state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_open_checkpoint_refuses_a_key_for_a_plain_model(recipient: tuple[Path, Path]) -> None:
    from tdllm.errors import UsageError

    with pytest.raises(UsageError, match="sealed"):
        open_checkpoint("bundled", key=recipient[1])


def test_open_sealed_asks_for_a_key(seal_tiny: Sealer) -> None:
    from tdllm.errors import UsageError

    with pytest.raises(UsageError, match="--key"):
        open_checkpoint(seal_tiny())


def test_refuses_to_seal_without_any_recipient_or_data_key(tmp_path: Path) -> None:
    from tdllm.errors import UsageError

    with pytest.raises(UsageError, match="recipient"):
        seal_checkpoint(synthetic_checkpoint(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def bundled_plain_and_sealed(
    tmp_path_factory: pytest.TempPathFactory, recipient: tuple[Path, Path]
) -> tuple[object, Path]:
    checkpoint = open_checkpoint("bundled")
    tensors = list(checkpoint.tensors())  # dequantize once, seal and load from memory
    checkpoint.tensors = lambda: iter(tensors)
    folder = tmp_path_factory.mktemp("bundled") / "sealed"
    seal_checkpoint(checkpoint, folder, [load_public_key(recipient[0])])
    return checkpoint, folder


def test_sealed_bundled_model_generates_the_same_greedy_tokens(
    bundled_plain_and_sealed: tuple[object, Path], recipient: tuple[Path, Path]
) -> None:
    checkpoint, folder = bundled_plain_and_sealed
    params = SamplingParams(temperature=0, max_tokens=16)
    outputs = []
    for source in (checkpoint, open_checkpoint(folder, key=recipient[1])):
        model, opened = load_model(source)  # type: ignore[arg-type]
        prompt = opened.tokenizer.encode("The capital of France is")
        engine = Engine(model, opened.tokenizer, max_batch=1, max_seq_len=64)
        outputs.append(engine.generate([prompt], params)[0].token_ids)
        del model, engine
    assert len(outputs[0]) == 16
    assert outputs[0] == outputs[1]
