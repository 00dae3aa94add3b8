"""A profile is one object: `build_model` asks it, the model carries none of its state, a new
profile is one class and one registry line, and a failed build gives its device back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tdllm.errors import UsageError
from tdllm.model.checkpoint import Checkpoint
from tdllm.model.config import ModelConfig
from tdllm.model.linear import Linear, LinearMethodTable, PlainCpuMethod
from tdllm.profiles import PROFILE_NAMES, ProtectionOptions, ServedModel, build_model
from tdllm.profiles.base import IdleWork, ProfileBase
from tdllm.profiles.registry import PROFILES, check_options
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.public_reference import PublicReference
from tests.protection.conftest import MAX_BATCH, MAX_SEQ, K, checkpoint_of, td_only
from tests.protection.engine_runs import greedy_tokens


@pytest.fixture
def options_for(
    base_tensors: dict[str, torch.Tensor], reference: PublicReference, tmp_path: Path
) -> Iterator[object]:
    """`options_for(profile)`: options that build `profile` on the tiny private model."""
    pinned = tmp_path / "reference.json"
    reference.save(pinned)
    base = checkpoint_of("tiny-base", base_tensors)

    def options(profile: str) -> ProtectionOptions:
        return ProtectionOptions(
            profile, "cpu", K, pinned, masked_base=base, obfuscation_seed=5, audit_rate=1.0
        )

    yield options


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_every_registered_profile_builds_a_served_model_that_glues_nothing_onto_modules(
    profile: str, private_checkpoint: Checkpoint, options_for
) -> None:  # type: ignore[no-untyped-def]
    plain = td_only(private_checkpoint)
    served = build_model(
        private_checkpoint, torch.float32, options_for(profile), MAX_BATCH, MAX_SEQ
    )
    try:
        assert (served.crossing is None) == (profile == "td-only")
        assert served.profile.name == profile
        tokens = greedy_tokens(served.model, n=3)
        if profile in ("td-only", "split"):  # exact; masked quantizes, obfuscated reorders sums
            assert tokens == greedy_tokens(plain, n=3)
        # profile state lives in the profile: every module holds only what its class made
        declared = dict(plain.named_modules())
        for name, module in served.model.named_modules():
            twin = declared.get(name)
            if twin is not None and type(twin) is type(module):
                assert set(vars(module)) <= set(vars(twin)), (
                    name,
                    set(vars(module)) - set(vars(twin)),
                )
    finally:
        served.close()


def test_only_masked_has_idle_work_and_the_served_model_hands_it_out(
    private_checkpoint: Checkpoint, options_for
) -> None:  # type: ignore[no-untyped-def]
    for profile in PROFILE_NAMES:
        served = build_model(private_checkpoint, torch.float32, options_for(profile), 1, MAX_SEQ)
        try:
            work = served.idle_work()
            assert (work is not None) == (profile == "masked"), profile
            if work is not None:
                assert work() is True  # one slice of pads done, more to do
        finally:
            served.close()


class _CountingMethod(PlainCpuMethod):
    def __init__(self) -> None:
        super().__init__()
        self.loaded: list[str] = []
        self.calls = 0

    def after_load(self, layer: Linear) -> None:
        self.loaded.append(layer.name)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().apply(layer, x)


class _Counting(ProfileBase):
    """A fifth profile as a user would add one: a class overriding the verbs it changes."""

    name = "counting"

    def linear_methods(self, cfg: ModelConfig) -> LinearMethodTable:
        self.method = _CountingMethod()
        return LinearMethodTable([("model.layers.*", self.method)])

    def idle_work(self) -> IdleWork | None:
        return lambda: False


def test_a_fifth_profile_is_one_class_and_one_registry_entry(
    private_checkpoint: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(PROFILES, _Counting.name, _Counting)
    check_options("counting", "cpu")
    served = build_model(
        private_checkpoint, torch.float32, ProtectionOptions("counting"), MAX_BATCH, MAX_SEQ
    )
    profile = served.profile
    assert isinstance(profile, _Counting) and served.crossing is None
    # after_load ran once per block projection, in module order, after every tensor was in
    assert profile.method.loaded[:2] == [
        "model.layers.0.self_attn.qkv_proj",
        "model.layers.0.self_attn.o_proj",
    ]
    assert len(profile.method.loaded) == 4 * served.model.cfg.num_layers
    assert greedy_tokens(served.model, n=2) == greedy_tokens(td_only(private_checkpoint), n=2)
    assert profile.method.calls > 0
    assert served.idle_work() is not None


def test_an_unknown_profile_is_a_usage_error_naming_the_choices(
    private_checkpoint: Checkpoint,
) -> None:
    with pytest.raises(UsageError, match="unknown profile 'nope'; choose td-only, split"):
        build_model(private_checkpoint, torch.float32, ProtectionOptions("nope"), 1, MAX_SEQ)
    with pytest.raises(UsageError, match="unknown device 'fpga'"):
        check_options("split", "fpga")


def test_a_failed_build_closes_the_crossing_it_opened(
    private_tensors: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[Crossing] = []
    close = Crossing.close

    def recording(self: Crossing) -> None:
        closed.append(self)
        close(self)

    monkeypatch.setattr(Crossing, "close", recording)
    opened: list[Crossing] = []
    open_ = Crossing.open

    def opening(kind: str, keep_payloads: bool = False) -> Crossing:
        opened.append(open_(kind, keep_payloads))
        return opened[-1]

    monkeypatch.setattr(Crossing, "open", staticmethod(opening))
    bad_k = ProtectionOptions("split", "cpu", k=99)
    with pytest.raises(UsageError, match="--k must be in"):
        build_model(checkpoint_of("tiny-private", private_tensors), torch.float32, bad_k, 1, 8)
    assert len(opened) == 1 and closed == opened


def test_served_model_close_closes_the_crossing_even_if_the_profile_fails_to(
    private_checkpoint: Checkpoint, options_for, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    served: ServedModel = build_model(
        private_checkpoint, torch.float32, options_for("split"), 1, MAX_SEQ
    )
    crossing = served.crossing
    assert crossing is not None

    def broken() -> None:
        raise RuntimeError("profile close failed")

    monkeypatch.setattr(served.profile, "close", broken)
    shut: list[bool] = []
    monkeypatch.setattr(crossing, "close", lambda: shut.append(True))
    with pytest.raises(RuntimeError, match="profile close failed"):
        served.close()
    assert shut == [True]
    Crossing.close(crossing)
