"""Only a `Publishable` crosses, only trusted code makes one, and each constructor checks its
reason: the attacks first (a raw tensor, a forged Publishable, a tensor smuggled as a parameter,
a BASE that is really the private model), then the honest paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tdllm.model.checkpoint import Checkpoint
from tdllm.profiles import ProtectionOptions, build_model
from tdllm.trusted import publishable
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.errors import PublicPrefixMismatchError
from tdllm.trusted.public_reference import PublicReference
from tdllm.trusted.publishable import Publishable
from tests.protection.conftest import MAX_BATCH, MAX_SEQ, K

SECRET = torch.arange(12, dtype=torch.float32).reshape(3, 4)


@pytest.fixture
def crossing() -> Crossing:
    c = Crossing.open("cpu", keep_payloads=True)
    yield c  # type: ignore[misc]
    c.close()


def test_a_publishable_cannot_be_forged_without_the_modules_mint() -> None:
    with pytest.raises(TypeError, match=r"made only by tdllm\.trusted\.publishable"):
        Publishable(SECRET, "trust me")
    with pytest.raises(TypeError, match="made only by"):
        Publishable(SECRET, "trust me", mint=object())


def test_the_crossing_refuses_a_raw_tensor_everywhere(crossing: Crossing) -> None:
    with pytest.raises(TypeError, match="only a Publishable crosses"):
        crossing.put("w", SECRET)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="only a Publishable crosses"):
        crossing.call("masked_ops.gemm_ring", {"x": SECRET}, {})  # type: ignore[dict-item]
    assert crossing.dump() == {}
    assert crossing.transcript.bytes_crossed() == 0


def test_a_tensor_smuggled_as_an_op_parameter_is_refused(crossing: Crossing) -> None:
    x = publishable.plaintext_activation(torch.zeros(1, 4))
    for params in ({"weight": SECRET}, {"slots": [0, SECRET]}, {"nested": [[1, SECRET]]}):
        with pytest.raises(TypeError, match="a name or a number"):
            crossing.call("obfuscated_ops.linear", {"x": x}, {}, params)
    assert crossing.transcript.bytes_crossed() == 0


def test_public_makes_nothing_unless_every_tensor_matches_the_reference() -> None:
    reference = PublicReference.build("base", [("a", SECRET), ("b", SECRET * 2)])
    tampered = {"a": SECRET, "b": SECRET * 2 + 1e-6}
    with pytest.raises(PublicPrefixMismatchError, match="1 of 2"):
        publishable.public(tampered, reference)
    with pytest.raises(PublicPrefixMismatchError, match="not in the public reference"):
        publishable.derived_from_public(lambda ts: ts[0], {"c": SECRET}, reference)
    made = publishable.public({"a": SECRET}, reference)
    assert made["a"].tensor is SECRET and "public" in made["a"].reason


def test_token_ids_must_be_integers_and_pads_must_match() -> None:
    with pytest.raises(TypeError, match="integers"):
        publishable.token_ids(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="int32 words"):
        publishable.one_time_padded(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 4))
    ids = publishable.token_ids(torch.tensor([[1, 2, 3]]))
    assert ids.tensor.dtype == torch.int64


def test_masked_refuses_a_base_that_is_really_the_private_model(
    private_checkpoint: Checkpoint, reference: PublicReference, tmp_path: Path
) -> None:
    """The attack: the masked BASE setting points at MODEL (a typo, or a host that rewrote the
    configuration). Unchecked, BASE == MODEL leaves a zero delta and the device holds MODEL's
    int8 weights. The pinned reference refuses it before a byte crosses."""
    pinned = tmp_path / "reference.json"
    reference.save(pinned)
    options = ProtectionOptions("masked", "cpu", K, pinned, masked_base=private_checkpoint)
    opened: list[Crossing] = []
    open_ = Crossing.open

    def recording(kind: str, keep_payloads: bool = False) -> Crossing:
        opened.append(open_(kind, keep_payloads=True))
        return opened[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Crossing, "open", staticmethod(recording))
        with pytest.raises(PublicPrefixMismatchError, match="not the public checkpoint"):
            build_model(private_checkpoint, torch.float32, options, MAX_BATCH, MAX_SEQ)
    (crossing,) = opened
    assert crossing.transcript.bytes_crossed() == 0


def test_every_tensor_a_served_profile_sends_is_a_publishable_with_its_reason(
    private_checkpoint: Checkpoint,
    base_tensors: dict[str, torch.Tensor],
    reference: PublicReference,
    tmp_path: Path,
) -> None:
    from tests.protection.conftest import checkpoint_of
    from tests.protection.engine_runs import greedy_tokens

    pinned = tmp_path / "reference.json"
    reference.save(pinned)
    base = checkpoint_of("tiny-base", base_tensors)
    seen: dict[str, set[str]] = {}
    put, call = Crossing.put, Crossing.call

    def recording_put(self: Crossing, name: str, value: Publishable) -> None:
        seen.setdefault("put", set()).add(value.reason)
        put(self, name, value)

    def recording_call(self: Crossing, op: str, args, expect, params=None):  # type: ignore[no-untyped-def]
        seen.setdefault(op, set()).update(a.reason for a in args.values())
        return call(self, op, args, expect, params)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Crossing, "put", recording_put)
        patch.setattr(Crossing, "call", recording_call)
        for profile in ("masked", "obfuscated"):
            options = ProtectionOptions(
                profile, "cpu", K, pinned, masked_base=base, obfuscation_seed=2
            )
            served = build_model(private_checkpoint, torch.float32, options, MAX_BATCH, MAX_SEQ)
            try:
                greedy_tokens(served.model, n=2)
            finally:
                served.close()
    assert seen["put"] == {
        "derived from public (tiny-base)",
        "obfuscated weight (seed 000; recoverable: A2/A4/A6)",
    }
    assert seen["masked_ops.gemm_ring"] == {"one-time padded"}
    plain = {"plaintext activation (obfuscated hides no inputs)"}
    assert seen["obfuscated_ops.linear"] == seen["obfuscated_ops.attention_scores"] == plain
