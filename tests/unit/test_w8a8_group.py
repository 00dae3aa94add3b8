"""The AVX2 library's int8 product (`avx2_kernel.w8a8g`, `Int8GroupAvx2Method`: ``quant:
w8a8-avx2``, and the head of ``w4a8`` on a CPU without AVX-512): the exact integer product of s8
codes and inputs rounded per 32, scaled by fp16 scales; Q8_0 blocks arrive in it exactly (Q8_0's
34 bytes a 32); rows are packed as they arrive (no staged copy of the whole); a host-chosen
weight beyond fp16 is one line naming the layer; and ``w4a8`` picks it, and the AVX2 int4
kernel, where AVX-512 is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tdllm.errors import ModelLoadError
from tdllm.model import avx2_kernel, avx512_kernel
from tdllm.model.gguf_blocks import GgufQuantized
from tdllm.model.int4_methods import Int4W4A8Method
from tdllm.model.int8_methods import Int8DynamicMethod, Int8GroupAvx2Method
from tdllm.model.linear import Linear
from tdllm.model.quantized import quant_table
from tests.cpu_kernels import needs_avx2
from tests.unit.test_gguf_quant_load import gguf_float, synthetic
from tests.unit.test_w4a8 import GROUP, exact, runs_near, stored_weights

pytestmark = needs_avx2


def packed_rows(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed, codes, scales)``: random s8 codes of every value a model's have, packed in two
    uneven parts (as a projection's rows arrive)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    # a file's Q8_0 code may be -128: |q| 128 times -127 (see below), in every pair of row 0's
    # second group, is the largest an int16 pair meets (2 x 128 x 127 < 32768): no saturation
    codes[0, : 2 * GROUP] = -128
    scales = torch.rand(n, k // GROUP, generator=g) / 100
    packed = avx2_kernel.empty8(n, k)
    assert packed.shape[-1] == 64 * 34  # Q8_0's bytes
    cut = n // 3
    avx2_kernel.pack8_into(packed, 0, codes[:cut], scales[:cut])
    avx2_kernel.pack8_into(packed, cut, codes[cut:], scales[cut:])
    return packed, codes, scales


@pytest.fixture(autouse=True)
def built() -> None:
    avx2_kernel.load("w4a8")


@pytest.mark.parametrize(
    ("rows", "n", "k"),
    [(1, 64, 32), (1, 1000, 96), (2, 130, 576), (3, 64, 256), (5, 65, 64), (13, 100, 2048),
     (0, 64, 64)],
)  # fmt: skip
def test_the_int8_kernel_gives_the_exact_product_of_its_rounded_inputs(
    rows: int, n: int, k: int
) -> None:
    packed, codes, scales = packed_rows(n, k, rows * 31 + n + k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k))
    if rows:
        x[0, :GROUP] = 0  # a zero group
        x[0, GROUP : 2 * GROUP] = -1  # every input -127 after rounding: the pairs' extreme
        x[-1, -GROUP:] *= 1000  # an outlier group rounds on its own step
    y = avx2_kernel.w8a8g(x, packed, n, k)
    assert y.shape == (rows, n)
    expected = exact(x, codes.float(), scales, torch.zeros_like(scales))
    bound = 2e-6 * max(1.0, float(expected.abs().max())) if rows else 0.0
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=bound)
    back = avx2_kernel.unpack8(packed, n, k)
    assert torch.equal(back[0], codes)
    assert torch.equal(back[1], scales.half().float())


def test_an_int8_row_gives_the_same_result_alone_and_in_any_batch() -> None:
    packed, *_ = packed_rows(130, 128, 3)
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(4))
    together = avx2_kernel.w8a8g(x, packed, 130, 128)
    for r in range(9):
        for first in {0, max(0, r - 2), max(0, r - 4)}:
            assert torch.equal(
                avx2_kernel.w8a8g(x[first : r + 1], packed, 130, 128)[-1], together[r]
            )


def test_bf16_inputs_give_the_fp32_products_rounded_to_bf16() -> None:
    packed, *_ = packed_rows(100, 64, 5)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(6)).bfloat16()
    y = avx2_kernel.w8a8g(x, packed, 100, 64)
    expected = avx2_kernel.w8a8g(x.float(), packed, 100, 64).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(
        y.view(torch.int16), expected.view(torch.int16)
    )


def test_q8_0_blocks_arrive_in_the_head_exactly_and_are_packed_as_they_arrive() -> None:
    """Q8_0 is ``d * q`` per 32 with an fp16 ``d``: its codes and scales, kept as they are, give
    it bit for bit. The staged buffer is the packed layout itself: the load never holds a second
    copy of the head."""
    blocks = synthetic("Q8_0", 300, 256)
    layer = Linear("lm_head", 256, 300, Int8GroupAvx2Method(), torch.float32)
    method = layer.method
    assert isinstance(method, Int8GroupAvx2Method)
    method.load_blocks(layer, blocks.row_slice(0, 100))
    staged = {n: b for n, b in layer._buffers.items() if n.startswith("staged_") and b is not None}
    assert list(staged) == ["staged_packed"]
    method.load_blocks(layer, blocks.row_slice(100, 300), row_offset=100)
    method.after_load(layer)
    codes, scales = avx2_kernel.unpack8(layer.qweight, 300, 256)
    stored = stored_weights(codes, scales, torch.zeros_like(scales))
    assert np.array_equal(stored.numpy(), gguf_float(blocks))


def test_float_rows_take_q8_0s_grid() -> None:
    weight = torch.randn(70, 96) / 10
    layer = Linear("lm_head", 96, 70, Int8GroupAvx2Method(), torch.float32)
    layer.load_weight(weight)
    codes, scales = avx2_kernel.unpack8(layer.qweight, 70, 96)
    step = weight.reshape(70, -1, GROUP).abs().amax(-1) / 127
    assert torch.equal(scales, step.half().float())
    stored = codes.float().reshape(70, -1, GROUP) * scales[..., None]
    # half a step of rounding, plus up to 127 codes of the step's own rounding to fp16
    error = (stored.reshape(70, 96) - weight).abs().reshape(70, -1, GROUP)
    bound = step / 2 + 127 * (step - scales).abs()
    assert bool((error <= bound[..., None] * 1.0001).all())
    x = torch.randn(2, 96)
    assert torch.allclose(layer(x), x @ stored.reshape(70, 96).T, rtol=0.05, atol=0.05)


def test_a_host_chosen_head_beyond_fp16s_scales_is_a_clear_load_error() -> None:
    weight = torch.zeros(64, 64)
    weight[7, 3] = 1e8  # a step of 1e8 / 127 in that group
    layer = Linear("lm_head", 64, 64, Int8GroupAvx2Method(), torch.float32)
    with pytest.raises(ModelLoadError, match=r"^lm_head: int8 scales beyond fp16"):
        layer.load_weight(weight)


def test_a_q8_0_block_of_any_fp16_scale_arrives_exactly() -> None:
    """A block's d is any fp16 the file holds (here 600 and 60000): kept as it is, with no
    offset to overflow."""
    blocks = synthetic("Q8_0", 64, 64)
    raw = blocks.blocks.copy()
    for row, d in ((5, 600.0), (9, 60000.0)):
        raw.reshape(64, -1, 34)[row, 1, 0:2] = np.array([d], dtype=np.float16).view(np.uint8)
    big = GgufQuantized("Q8_0", (64, 64), raw)
    layer = Linear("lm_head", 64, 64, Int8GroupAvx2Method(), torch.float32)
    method = layer.method
    assert isinstance(method, Int8GroupAvx2Method)
    method.load_blocks(layer, big)
    method.after_load(layer)
    codes, scales = avx2_kernel.unpack8(layer.qweight, 64, 64)
    stored = stored_weights(codes, scales, torch.zeros_like(scales))
    assert np.array_equal(stored.numpy(), gguf_float(big))


def test_the_model_runs_on_w8a8_avx2_near_int8_and_a_prompts_rows_alone_or_together() -> None:
    """Every projection and the head on the AVX2 int8 product: the logits stay near int8
    weight-only's (inputs rounded per 32 its only extra cost), and a prompt's rows are the same
    alone or beside another prompt's."""
    model = runs_near("int8", "w8a8-avx2", 0.05)
    assert all(
        isinstance(m.method, Int8GroupAvx2Method) for m in model.modules() if isinstance(m, Linear)
    )


def test_w4a8_runs_both_kernels_where_the_cpu_has_no_avx512(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(avx512_kernel, "missing_cpu_flags", lambda: ["avx512f"])
    table = quant_table("w4a8")
    body, head = table.method_for("layers.0.mlp.down_proj"), table.method_for("lm_head")
    assert isinstance(body, Int4W4A8Method) and body.kernel is avx2_kernel
    assert isinstance(head, Int8GroupAvx2Method)
    monkeypatch.setattr(avx512_kernel, "missing_cpu_flags", lambda: [])
    table = quant_table("w4a8")
    body, head = table.method_for("layers.0.mlp.down_proj"), table.method_for("lm_head")
    assert isinstance(body, Int4W4A8Method) and body.kernel is avx512_kernel
    assert isinstance(head, Int8DynamicMethod) and head.backend == "avx512"
