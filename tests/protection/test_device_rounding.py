"""Per-device tolerances of `split`'s checks (tdllm/trusted/device_rounding.py): a device that
rounds differently from the TD (a GPU) passes within its measured tolerance, while a forgery
above it, or a non-finite value under any tolerance, still stops serving. The GPU itself is
tested in tests/gpu (`make test-gpu`); here a CPU device adds GPU-sized rounding noise."""

from __future__ import annotations

import click
import pytest
import torch

from tdllm.model.checkpoint import Checkpoint
from tdllm.model.transformer import Transformer
from tdllm.trusted.crossing import DEVICE_KINDS, Crossing, available_devices
from tdllm.trusted.device_rounding import DeviceRounding, rounding_of
from tdllm.trusted.errors import DeviceIntegrityError
from tdllm.trusted.public_reference import PublicReference
from tdllm.trusted.split import OffloadedPrefix, offload_public_prefix
from tdllm.untrusted.device import InProcessDevice
from tdllm_lab.bench.device_tolerance import UNBOUNDED
from tdllm_lab.bench.protection_commands import device_list
from tests.protection.conftest import MAX_BATCH, MAX_SEQ, K, td_only
from tests.protection.engine_runs import greedy_tokens

GPU_LIKE = DeviceRounding(
    exact_replay=False, audit_tolerance={torch.float32: 2e-5}, freivalds_factor=0.25
)


class NoisyDevice(InProcessDevice):
    """Honest, but every hidden state carries relative noise of `size` (of the row's largest
    value), as a GPU's other summation order does; NaN with `size` = nan."""

    def __init__(self, size: float) -> None:
        super().__init__("cpu")
        self.size, self.steps = size, 0

    def run_prefix(self, tokens: torch.Tensor, slots: list[int], starts: list[int]) -> torch.Tensor:
        hidden = super().run_prefix(tokens, slots, starts).clone()
        scale = hidden.abs().amax(dim=-1, keepdim=True)
        self.steps += 1
        g = torch.Generator().manual_seed(self.steps)
        return hidden + self.size * scale * (2 * torch.rand(hidden.shape, generator=g) - 1)


def split_on(
    checkpoint: Checkpoint, reference: PublicReference, size: float, rounding: DeviceRounding
) -> Transformer:
    model = td_only(checkpoint)
    placed = offload_public_prefix(
        model,
        checkpoint,
        reference,
        Crossing(NoisyDevice(size)),
        K,
        MAX_BATCH,
        MAX_SEQ,
        1.0,
        1.0,
        rounding,
    )
    model.place(placed)
    return model


def checks(model: Transformer) -> OffloadedPrefix:
    assert isinstance(model.prefix, OffloadedPrefix)
    return model.prefix


def test_a_device_rounding_like_a_gpu_passes_within_its_tolerance(
    private_checkpoint: Checkpoint, reference: PublicReference
) -> None:
    model = split_on(private_checkpoint, reference, 1e-6, GPU_LIKE)
    assert greedy_tokens(model) == greedy_tokens(td_only(private_checkpoint))
    audit = checks(model).audit
    assert audit is not None and audit.checked_rows > 0
    assert 0 < audit.max_deviation <= 2e-6  # the noise, measured against the honest row


def test_the_same_rounding_fails_the_cpus_exact_replay(
    private_checkpoint: Checkpoint, reference: PublicReference
) -> None:
    # why a GPU needs its own entry: the TD's CPU kernels replay the device's batch bit for bit
    model = split_on(private_checkpoint, reference, 1e-6, rounding_of("cpu"))
    with pytest.raises(DeviceIntegrityError, match="re-execution audit"):
        greedy_tokens(model)


def test_a_forgery_above_the_tolerance_is_caught_without_exact_replay(
    private_checkpoint: Checkpoint, reference: PublicReference
) -> None:
    model = split_on(private_checkpoint, reference, 1e-3, GPU_LIKE)
    with pytest.raises(DeviceIntegrityError, match="re-execution audit"):
        greedy_tokens(model)
    assert checks(model).failure is not None  # and the device is never used again


def test_a_non_finite_hidden_state_fails_even_an_unbounded_tolerance(
    private_checkpoint: Checkpoint, reference: PublicReference
) -> None:
    model = split_on(private_checkpoint, reference, float("nan"), UNBOUNDED)
    with pytest.raises(DeviceIntegrityError):
        greedy_tokens(model)


def test_freivalds_measures_the_honest_residual_and_refuses_non_finite_products(
    private_checkpoint: Checkpoint, reference: PublicReference
) -> None:
    model = split_on(private_checkpoint, reference, 0.0, UNBOUNDED)
    greedy_tokens(model)
    freivalds = checks(model).freivalds
    assert freivalds is not None and freivalds.checked > 0
    assert 0 < freivalds.max_ratio < rounding_of("cpu").freivalds_factor
    name = sorted(freivalds.weights)[0]
    w = freivalds.weights[name]
    x = torch.randn(3, w.shape[1])
    y = x @ w.T
    assert freivalds.residual_ratio(name, x, y) is not None
    y[1, 0] = float("nan")
    assert freivalds.residual_ratio(name, x, y) is None
    assert not freivalds.verify(name, x, y)


def test_every_device_kind_has_a_measured_rounding_and_only_the_cpus_replay_exactly() -> None:
    assert {k: rounding_of(k).exact_replay for k in DEVICE_KINDS} == {
        "cpu": True,
        "process": True,
        "cuda": False,
    }
    cuda = rounding_of("cuda")
    assert cuda.audit_tolerance_for(torch.float32) < cuda.audit_tolerance_for(torch.bfloat16)
    with pytest.raises(ValueError, match="no measured rounding"):
        rounding_of("tpu")
    with pytest.raises(ValueError, match="no audit tolerance"):
        cuda.audit_tolerance_for(torch.float16)


def test_bench_devices_are_checked_before_any_model_is_built() -> None:
    assert device_list("cpu, process") == ("cpu", "process")
    with pytest.raises(click.BadParameter, match="tpu"):
        device_list("cpu,tpu")
    with pytest.raises(click.BadParameter, match="none given"):
        device_list(" , ")
    if "cuda" not in available_devices():
        with pytest.raises(click.BadParameter, match="cuda not available here"):
            device_list("cuda")
