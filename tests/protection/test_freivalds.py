"""Freivalds spot checks: honest device products pass, forged ones are caught and stop serving."""

from __future__ import annotations

import pytest
import torch

from tdllm.model.checkpoint import Checkpoint
from tdllm.model.transformer import Transformer
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.errors import DeviceIntegrityError
from tdllm.trusted.freivalds import FreivaldsCheck
from tdllm.trusted.public_reference import PublicReference
from tdllm.trusted.split import OffloadedPrefix, offload_public_prefix, prefix_projections
from tdllm.untrusted.device import InProcessDevice, UntrustedDevice, open_device
from tdllm_lab.protection.freivalds_rate import detection_rate
from tests.protection.conftest import MAX_BATCH, MAX_SEQ, K, td_only
from tests.protection.engine_runs import greedy_tokens


class GemmForgingDevice(InProcessDevice):
    """Runs honestly but reports one projection output with one entry changed."""

    def gemm_io(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = dict(super().gemm_io(names))
        key = f"{sorted(names)[-1]}:y"
        forged = out[key].clone()
        forged.view(-1)[0] += 0.05 * float(forged.abs().max())
        out[key] = forged
        return out


def placement(model: Transformer) -> OffloadedPrefix:
    assert isinstance(model.prefix, OffloadedPrefix)
    return model.prefix


def freivalds_of(model: Transformer) -> FreivaldsCheck:
    check = placement(model).freivalds
    assert check is not None
    return check


def split_with_freivalds(
    checkpoint: Checkpoint, reference: PublicReference, device: UntrustedDevice, rate: float = 1.0
) -> tuple[Transformer, Crossing]:
    model = td_only(checkpoint)
    crossing = Crossing(device)
    placed = offload_public_prefix(
        model, checkpoint, reference, crossing, K, MAX_BATCH, MAX_SEQ, 0.0, freivalds_rate=rate
    )
    model.place(placed)
    return model, crossing


@pytest.mark.parametrize("kind", ["cpu", "process"])
def test_an_honest_device_passes_every_freivalds_check_and_tokens_match(
    kind: str, private_checkpoint: Checkpoint, reference: PublicReference
) -> None:
    model, crossing = split_with_freivalds(private_checkpoint, reference, open_device(kind))
    try:
        assert greedy_tokens(model) == greedy_tokens(td_only(private_checkpoint))
        assert freivalds_of(model).checked > 0
    finally:
        crossing.close()


def test_a_forged_gemm_output_is_caught_and_the_secret_vectors_are_redrawn(
    private_checkpoint: Checkpoint, reference: PublicReference
) -> None:
    model, crossing = split_with_freivalds(private_checkpoint, reference, GemmForgingDevice())
    try:
        vectors = freivalds_of(model)._vectors
        with pytest.raises(DeviceIntegrityError, match="Freivalds check failed"):
            greedy_tokens(model)
        assert freivalds_of(model)._vectors is not vectors
        with pytest.raises(DeviceIntegrityError, match="serving stopped"):
            greedy_tokens(model)
    finally:
        crossing.close()


def test_one_entry_forgeries_above_tolerance_are_all_detected(
    private_checkpoint: Checkpoint, reference: PublicReference
) -> None:
    model, crossing = split_with_freivalds(private_checkpoint, reference, InProcessDevice())
    try:
        greedy_tokens(model)
        names = sorted(prefix_projections(model, placement(model).num_layers))
        io = crossing.gemm_io(names)
        records = {n: (io[f"{n}:x"], io[f"{n}:y"]) for n in names}
        check = FreivaldsCheck(prefix_projections(model, placement(model).num_layers), 1.0)
        assert all(check.verify(n, x, y) for n, (x, y) in records.items())
        assert detection_rate(check, records, 1e-2, trials=200, seed=7) == 1.0
    finally:
        crossing.close()
