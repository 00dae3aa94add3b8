"""`tdllm bench split`'s TD FLOP count: with the process device only the TD's own work is seen."""

from __future__ import annotations

import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.model.checkpoint import Checkpoint
from tdllm.profiles import ProtectionOptions, build_model
from tdllm_lab.attacks.device_view import NoTokenizer
from tdllm_lab.bench.split import _Run
from tests.protection.conftest import MAX_SEQ, K


def _td_flops(checkpoint: Checkpoint, profile: str, device: str) -> int:
    options = ProtectionOptions(profile, device, K, obfuscation_seed=0)
    served = build_model(checkpoint, torch.float32, options, 1, MAX_SEQ)
    model = served.model
    try:
        engine = Engine(model, NoTokenizer(), 1, MAX_SEQ)  # type: ignore[arg-type]
        run = _Run(profile, device, "none", served, engine)
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        return run.count_flops(list(range(3, 15)), params)
    finally:
        served.close()


def test_the_process_device_keeps_the_devices_flops_out_of_the_tds_count(
    private_checkpoint: Checkpoint,
) -> None:
    td_only = _td_flops(private_checkpoint, "td-only", "cpu")
    in_process = _td_flops(private_checkpoint, "obfuscated", "cpu")
    separate = _td_flops(private_checkpoint, "obfuscated", "process")
    # in one process the device's padded GEMMs are counted too (more than the plain model)
    assert in_process > td_only
    # in its own process they are not: the TD keeps the decoy scores, restores and softmax.V
    assert 0 < separate < 0.5 * td_only
