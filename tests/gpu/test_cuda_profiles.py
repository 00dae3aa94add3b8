"""The `cuda` device with the real model: every device profile gives the tokens it gives on the
TD's CPU, `split`'s checks pass an honest GPU with the measured tolerances
(tdllm/trusted/device_rounding.py) and stop one that forges a product, and `masked`'s ring
products stay exact. Marked `gpu`: `make test-gpu` on a machine with an NVIDIA GPU."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tdllm.engine import Engine, SamplingParams
from tdllm.model.checkpoint import Checkpoint
from tdllm.profiles import ProtectionOptions, ServedModel, build_model
from tdllm.trusted.errors import DeviceIntegrityError
from tdllm.trusted.split import OffloadedPrefix
from tdllm.untrusted.device import InProcessDevice
from tdllm.untrusted.masked_ops import gemm_ring
from tdllm_lab.protection.private_model import stand_in_checkpoint

pytestmark = pytest.mark.gpu

K = 2
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "List three prime numbers:",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def private(bundled_checkpoint: Checkpoint) -> Checkpoint:
    return stand_in_checkpoint(bundled_checkpoint, K)


@pytest.fixture(scope="module")
def token_prompts(bundled_checkpoint: Checkpoint) -> list[list[int]]:
    tokenizer = bundled_checkpoint.tokenizer
    assert tokenizer is not None
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture
def built() -> Iterator[list[ServedModel]]:
    served: list[ServedModel] = []
    yield served
    for s in served:
        s.close()


def greedy(
    checkpoint: Checkpoint,
    options: ProtectionOptions,
    prompts: list[list[int]],
    built: list[ServedModel],
    dtype: torch.dtype = torch.float32,
) -> tuple[list[list[int]], ServedModel]:
    max_seq = max(map(len, prompts)) + NEW_TOKENS + 1
    served = build_model(checkpoint, dtype, options, len(prompts), max_seq)
    built.append(served)
    engine = Engine(served.model, checkpoint.tokenizer, len(prompts), max_seq)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return [c.token_ids for c in engine.generate(prompts, params)], served


def split_checks(served: ServedModel) -> OffloadedPrefix:
    placement = served.model.prefix
    assert isinstance(placement, OffloadedPrefix)
    return placement


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_on_cuda_passes_every_check_and_gives_the_cpu_tokens(
    private: Checkpoint,
    token_prompts: list[list[int]],
    built: list[ServedModel],
    dtype: torch.dtype,
) -> None:
    checks = {"audit_rate": 1.0, "freivalds_rate": 1.0}
    on_cpu, _ = greedy(
        private, ProtectionOptions("split", "cpu", K, **checks), token_prompts, built, dtype
    )
    on_gpu, served = greedy(
        private, ProtectionOptions("split", "cuda", K, **checks), token_prompts, built, dtype
    )
    placement = split_checks(served)
    assert placement.audit is not None and placement.audit.checked_rows > 0
    assert placement.freivalds is not None and placement.freivalds.checked > 0
    if dtype == torch.float32:
        assert on_gpu == on_cpu
    # bf16: the checks above passed (no honest step stopped), but greedy tokens may part from
    # the CPU's: a bf16 prefix rounds differently on the GPU (measured: `tdllm bench tolerance`)


def test_masked_on_cuda_gives_the_cpu_tokens(
    private: Checkpoint, token_prompts: list[list[int]], built: list[ServedModel]
) -> None:
    on_cpu, _ = greedy(private, ProtectionOptions("masked", "cpu", K), token_prompts, built)
    on_gpu, _ = greedy(private, ProtectionOptions("masked", "cuda", K), token_prompts, built)
    assert on_gpu == on_cpu  # ring products are exact integers on both: bit-identical logits


def test_obfuscated_on_cuda_gives_the_td_only_tokens(
    private: Checkpoint, token_prompts: list[list[int]], built: list[ServedModel]
) -> None:
    expected, _ = greedy(private, ProtectionOptions("td-only"), token_prompts, built)
    on_gpu, _ = greedy(
        private,
        ProtectionOptions("obfuscated", "cuda", K, obfuscation_seed=5),
        token_prompts,
        built,
    )
    assert on_gpu == expected


@pytest.mark.parametrize("check", ["audit", "freivalds"])
def test_a_cuda_device_that_forges_a_prefix_product_is_stopped(
    private: Checkpoint, token_prompts: list[list[int]], built: list[ServedModel], check: str
) -> None:
    rates = {"audit_rate": 1.0 if check == "audit" else 0.0}
    rates["freivalds_rate"] = 1.0 if check == "freivalds" else 0.0
    max_seq = max(map(len, token_prompts)) + NEW_TOKENS + 1
    served = build_model(
        private, torch.float32, ProtectionOptions("split", "cuda", K, **rates), 1, max_seq
    )
    built.append(served)
    assert served.crossing is not None
    device = served.crossing.device
    assert isinstance(device, InProcessDevice) and device.prefix is not None
    # the host nudges one projection it holds on the GPU: 2% on one layer's down_proj
    weight = device.prefix.weights["model.layers.3.mlp.down_proj.weight"]
    weight.mul_(1.02)
    engine = Engine(served.model, private.tokenizer, 1, max_seq)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with pytest.raises(DeviceIntegrityError):
        engine.generate([token_prompts[0]], params)


def test_masked_ring_product_on_cuda_is_the_exact_integer_product() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (1536, 576), generator=g, dtype=torch.int8)
    words = torch.randint(-(2**31), 2**31 - 1, (7, 576), generator=g, dtype=torch.int64)
    x = words.to(torch.int32)
    exact = words @ weight.to(torch.int64).T  # int64 on the CPU: exact, no overflow at 2^38*576
    on_gpu = gemm_ring({"w": weight.cuda()}, {"x": x.cuda()}, {"weight": "w"})["y"].cpu()
    assert torch.equal(on_gpu, exact)
