"""`tdllm bench transcript`: the digest of what a device saw is a pure function of what crossed
(two runs agree), and it notices a change in what crosses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tdllm.model.checkpoint import Checkpoint
from tdllm.profiles import ProtectionOptions
from tdllm.trusted.public_reference import PublicReference
from tdllm_lab.attacks.device_view import NoTokenizer
from tdllm_lab.bench.transcript import digest
from tests.protection.conftest import K, checkpoint_of

PROMPTS = [[5, 17, 3, 42], [8, 9, 1]]


@pytest.fixture
def options_for(
    base_tensors: dict[str, torch.Tensor], reference: PublicReference, tmp_path: Path
) -> object:
    reference.save(pinned := tmp_path / "reference.json")
    base = checkpoint_of("tiny-base", base_tensors)

    def options(profile: str, seed: int = 0) -> ProtectionOptions:
        return ProtectionOptions(
            profile, k=K, public_reference=pinned, masked_base=base, obfuscation_seed=seed
        )

    return options


@pytest.mark.parametrize("profile", ["split", "masked", "obfuscated"])
def test_two_runs_of_one_commit_give_one_digest(
    profile: str, private_checkpoint: Checkpoint, options_for
) -> None:  # type: ignore[no-untyped-def]
    private_checkpoint.tokenizer = NoTokenizer()  # type: ignore[assignment]
    first = digest(private_checkpoint, options_for(profile), 3, PROMPTS)
    second = digest(private_checkpoint, options_for(profile), 3, PROMPTS)
    assert first == second
    assert (first["padded_records"] > 0) == (profile == "masked")


def test_the_digest_sees_a_change_in_what_crosses(
    private_checkpoint: Checkpoint, options_for
) -> None:  # type: ignore[no-untyped-def]
    private_checkpoint.tokenizer = NoTokenizer()  # type: ignore[assignment]
    seed0 = digest(private_checkpoint, options_for("obfuscated", 0), 3, PROMPTS)
    seed1 = digest(private_checkpoint, options_for("obfuscated", 1), 3, PROMPTS)
    assert seed0["records"] == seed1["records"]
    assert seed0["seen_sha256"] != seed1["seen_sha256"]
    assert seed0["held_sha256"] != seed1["held_sha256"]
    other_prompts = digest(private_checkpoint, options_for("split"), 3, [[5, 17, 3, 43], [8, 9, 1]])
    assert (
        other_prompts["seen_sha256"]
        != digest(private_checkpoint, options_for("split"), 3, PROMPTS)["seen_sha256"]
    )
