"""Nothing reaches a device unless it hashes to the pinned public checkpoint."""

from __future__ import annotations

import pytest
import torch

from tdllm.trusted.crossing import Crossing
from tdllm.trusted.errors import PublicPrefixMismatchError
from tdllm.trusted.public_reference import PublicReference
from tdllm_lab.protection.prepare import PrepareRefusedError, prepare_split
from tests.protection.conftest import K, checkpoint_of


def test_split_refuses_a_prefix_layer_that_is_not_public_and_sends_nothing(
    private_tensors, reference, split_on
) -> None:  # type: ignore[no-untyped-def]
    tampered = dict(private_tensors)
    name = "model.layers.1.self_attn.o_proj.weight"
    tampered[name] = tampered[name].clone()
    tampered[name][0, 0] += 1e-3
    crossing = Crossing.open("cpu")
    with pytest.raises(PublicPrefixMismatchError, match=name):
        split_on(checkpoint_of("bad", tampered), reference, crossing)
    assert crossing.transcript.records == []


def test_prepare_reports_every_differing_prefix_layer(
    base_tensors, private_tensors, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    base = checkpoint_of("base", base_tensors)
    with pytest.raises(PrepareRefusedError) as caught:  # K too small: layer 2 is fine-tuned
        prepare_split(base, checkpoint_of("private", private_tensors), K - 1, tmp_path)
    assert "layer 2: " in str(caught.value)
    assert "layer 3" not in str(caught.value) and "layer 0" not in str(caught.value)
    assert not (tmp_path / "public-prefix.json").exists()


def test_prepare_writes_a_reference_that_the_split_accepts(
    base_tensors, private_tensors, tmp_path, split_on
) -> None:  # type: ignore[no-untyped-def]
    base, private = checkpoint_of("base", base_tensors), checkpoint_of("private", private_tensors)
    written = prepare_split(base, private, K, tmp_path)
    reference = PublicReference.load(written)
    assert "model.layers.1.mlp.up_proj.weight" in reference.hashes
    assert "model.layers.2.mlp.up_proj.weight" not in reference.hashes  # the tail is not public
    assert "lm_head.weight" not in reference.hashes
    split_on(private, reference, Crossing.open("cpu"))


def test_pinned_bundled_reference_matches_the_bundled_checkpoint(bundled_checkpoint) -> None:  # type: ignore[no-untyped-def]
    from tdllm.profiles.options import PINNED_REFERENCE

    pinned = PublicReference.load(PINNED_REFERENCE)
    for name, tensor in bundled_checkpoint.tensors():
        if name.startswith(("model.embed_tokens", "model.layers.0.")):
            assert pinned.mismatches(name, tensor) is None, name
    assert pinned.mismatches("model.layers.0.mlp.up_proj.weight", torch.zeros(1)) is not None
