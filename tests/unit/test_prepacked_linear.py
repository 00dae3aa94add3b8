"""bf16 weights prepacked for oneDNN (tdllm.model.linear.PrepackedCpuMethod): the same product as
`F.linear`, bit for bit at decode's row counts (within one bf16 step at a prefill's on AMX),
the plain copy scrubbed and dropped, and nothing prepacked where it would cost a second copy (a
tied head) or where the kernel does not apply (fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tdllm.engine import Engine, SamplingParams
from tdllm.model.linear import Linear, LinearMethodTable, PrepackedCpuMethod, can_prepack_bf16
from tdllm.model.loader import load_model
from tdllm.model.quantized import quant_table
from tdllm.sources import open_checkpoint

pytestmark = pytest.mark.skipif(
    not can_prepack_bf16(), reason="no oneDNN prepacked bf16 linear, or no native bf16 CPU"
)


def _layer(out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16) -> Linear:
    layer = Linear("t", in_features, out_features, PrepackedCpuMethod(), dtype)
    layer.load_weight(
        torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(1))
    )
    return layer


def _plain_size(layer: Linear) -> int:
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    return weight.numel()


@pytest.mark.parametrize("rows", [1, 8, 32])
def test_prepacked_product_equals_f_linear_bit_for_bit(rows: int) -> None:
    layer = _layer(960, 576)
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    weight = weight.detach().clone()
    x = torch.randn(rows, 576).to(torch.bfloat16)
    layer.method.after_load(layer)
    assert torch.equal(layer(x), F.linear(x, weight))
    assert torch.equal(layer(x[None]), F.linear(x[None], weight))  # [B, T, in] as the model has


def test_a_prefill_sized_product_is_within_one_bf16_step_of_f_linear() -> None:
    """On a CPU with AMX, oneDNN runs the prepacked weight (inner product) and `F.linear`
    (matmul) in two AMX kernels whose sums are blocked differently: from 64 rows a few outputs
    in 10^4 round to the neighbouring bf16 value (measured: 7 of 122880 at 128 rows)."""
    layer = _layer(960, 576)
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    weight = weight.detach().clone()
    x = torch.randn(128, 576, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    layer.method.after_load(layer)
    ours, plain = layer(x).float(), F.linear(x, weight).float()
    step = torch.finfo(torch.bfloat16).eps * plain.abs()  # one bf16 step at each value
    assert bool(((ours - plain).abs() <= step).all())
    assert (ours != plain).float().mean().item() < 1e-3


def test_the_plain_copy_is_scrubbed_and_dropped() -> None:
    layer = _layer(64, 32)
    plain = layer.weight
    assert isinstance(plain, torch.Tensor)
    layer.method.after_load(layer)
    assert _plain_size(layer) == 0
    assert not plain.any()  # a sealed model's plaintext does not linger in freed memory


def test_fp32_weights_and_a_shared_weight_stay_plain() -> None:
    fp32 = _layer(64, 32, torch.float32)
    fp32.method.after_load(fp32)
    assert _plain_size(fp32) == 64 * 32 and "packed_weight" not in fp32.__dict__
    tied = _layer(64, 32)
    tied.shared_weight = True  # what Transformer._tie_lm_head marks
    tied.method.after_load(tied)
    assert _plain_size(tied) == 64 * 32 and "packed_weight" not in tied.__dict__


def test_bundled_model_decodes_the_same_tokens_prepacked() -> None:
    checkpoint = open_checkpoint("bundled")
    outputs = []
    for table in (LinearMethodTable(), quant_table("none")):
        model, _ = load_model(checkpoint, torch.bfloat16, table)
        engine = Engine(model, checkpoint.tokenizer, 2, 128)
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        prompts = [
            checkpoint.tokenizer.encode(p) for p in ("The capital of France is", "def f(x):")
        ]
        outputs.append([c.token_ids for c in engine.generate(prompts, params)])
    assert outputs[0] == outputs[1]
    assert model.lm_head.shared_weight  # the bundled model ties its head: that one stays plain
    packed = [m for m in model.modules() if isinstance(m, Linear) and "packed_weight" in m.__dict__]
    assert len(packed) == 4 * model.cfg.num_layers  # qkv, o, gate|up, down of every block
