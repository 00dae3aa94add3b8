"""Our int4 kernels (``quant: w4a8``: `avx512_kernel.w4a8` where the CPU has AVX-512 VNNI,
`avx2_kernel.w4a8` elsewhere; ``w4a8-avx512``): each product is the exact integer product of the
codes and the inputs rounded per 32, scaled by the fp16 scales and offsets; a row's result does
not depend on its batch; the two kernels give the same bits; GGUF Q4_0 blocks arrive in them
exactly; and the model runs on them with int4's weights. The AVX2 library's int8 product (the
head of ``w4a8`` there): `tests/unit/test_w8a8_group.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tdllm.errors import ModelLoadError
from tdllm.model import avx2_kernel, avx512_kernel
from tdllm.model.int4_methods import Int4Avx512Method, Int4W4A8Method, W4A8Kernel, int4_quantize
from tdllm.model.linear import Linear
from tdllm.model.quantized import quant_table
from tdllm.model.transformer import Batch, KVCache, Transformer
from tests.cpu_kernels import needs_avx2, needs_avx512
from tests.tiny_model import tiny_model
from tests.unit.test_gguf_quant_load import gguf_float, synthetic

GROUP = avx512_kernel.GROUP
KERNELS = [
    pytest.param(avx512_kernel, marks=needs_avx512, id="avx512"),
    pytest.param(avx2_kernel, marks=needs_avx2, id="avx2"),
]


@pytest.fixture(params=KERNELS)
def kernel(request: pytest.FixtureRequest) -> W4A8Kernel:
    """Each int4 kernel this CPU runs, loaded."""
    module: W4A8Kernel = request.param
    module.load("w4a8")
    return module


def rounded_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs as the kernel rounds them: ``(xq [M, G, 32], dx [M, G])``, ``xq = round(x /
    dx)`` to nearest even, ``dx = max|x| / 127`` per group (0 for a zero group)."""
    groups = x.reshape(x.shape[0], x.shape[1] // GROUP, GROUP)
    most = groups.abs().amax(-1)
    inverse = torch.where(most > 0, 127 / most, torch.zeros_like(most))
    return torch.round(groups * inverse[..., None]), most / 127


def exact(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """What the kernel must give, in float64 from the integer sums (fp16 scales and offsets)."""
    xq, dx = rounded_inputs(x)
    n = codes.shape[0]
    dots = torch.einsum("mgk,ngk->mng", xq.double(), codes.reshape(n, -1, GROUP).double())
    sums = xq.sum(-1).double()[:, None, :]
    s, f = scales.half().double(), offsets.half().double()
    return (dx.double()[:, None, :] * (s * dots + f * sums)).sum(-1)


def stored_weights(
    codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """``[N, K]`` fp32: the weights a kernel's layout holds (read back by its unpack)."""
    n = codes.shape[0]
    grouped = codes.float().reshape(n, -1, GROUP) * scales[..., None] + offsets[..., None]
    return grouped.reshape(n, -1)


def runs_near(reference: str, quant: str, tolerance: float) -> Transformer:
    """The tiny model on `quant`: its logits within `tolerance` (of the largest) of
    `reference`'s, and a prompt's rows the same alone or beside another prompt's."""
    tokens = torch.tensor([[5, 9, 13, 2, 44, 7]])
    logits = []
    for name in (reference, quant):
        model = tiny_model(methods=quant_table(name))
        cache = KVCache(model.cfg, 2, 16, torch.float32)
        logits.append(model(tokens, Batch([0], [0], 6), cache, last_only=False))
    assert torch.allclose(logits[0], logits[1], atol=tolerance * float(logits[0].abs().max()))
    cache = KVCache(model.cfg, 2, 16, torch.float32)
    together = model(
        torch.tensor([tokens[0].tolist(), [5, 9, 13, 0, 0, 0]]),
        Batch([0, 1], [0, 0], 6, lengths=[6, 3]),
        cache,
        last_only=False,
    )
    assert torch.equal(together[0], logits[1][0])  # a prompt's rows: the same alone or not
    return model


def random_weights(
    n: int, k: int, seed: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random codes, scales and offsets; `symmetric`: Q4_0's grid, every offset -8 scale (fp16
    scales, as a file's)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scales = torch.rand(n, k // GROUP, generator=g) / 100
    if symmetric:
        scales = scales.half().float()
        return codes, scales, -8 * scales
    offsets = -8 * scales + torch.randn(n, k // GROUP, generator=g) / 1000
    return codes, scales, offsets


@pytest.mark.parametrize("symmetric", [False, True], ids=["offsets", "symmetric"])
@pytest.mark.parametrize(
    ("rows", "n", "k"),
    [(1, 64, 32), (1, 1000, 96), (2, 130, 576), (3, 64, 256), (4, 65, 64), (6, 200, 512),
     (7, 576, 576), (13, 100, 2048), (0, 64, 64)],
)  # fmt: skip
def test_the_int4_kernel_gives_the_exact_product_of_its_rounded_inputs(
    kernel: W4A8Kernel, rows: int, n: int, k: int, symmetric: bool
) -> None:
    codes, scales, offsets = random_weights(n, k, rows * 7919 + n * 31 + k, symmetric)
    packed = kernel.pack4(codes, scales, offsets)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k))
    if rows:
        x[0, :GROUP] = 0  # a zero group: a zero step, not 0/0
        x[-1, -GROUP:] *= 1000  # an outlier group rounds on its own step, not the row's
    y = kernel.w4a8(x, packed, n, k)
    assert y.shape == (rows, n)
    expected = exact(x, codes, scales, offsets)
    bound = 2e-6 * max(1.0, float(expected.abs().max())) if rows else 0.0
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=bound)
    back = kernel.unpack4(packed, n, k)
    assert torch.equal(back[0], codes)
    assert torch.equal(back[1], scales.half().float()) and torch.equal(
        back[2], offsets.half().float()
    )


def test_a_row_gives_the_same_result_alone_and_in_any_batch(kernel: W4A8Kernel) -> None:
    """Every row count takes its own register blocking (AVX-512: one to six rows, one or two
    passes over a block; AVX2: one to four); each row's sums and scaling run in the same order in
    all of them."""
    codes, scales, offsets = random_weights(192, 128, 5)
    packed = kernel.pack4(codes, scales, offsets)
    x = torch.randn(17, 128, generator=torch.Generator().manual_seed(6))
    together = kernel.w4a8(x, packed, 192, 128)
    for r in range(17):
        for first in {0, max(0, r - 3), max(0, r - 5)}:
            batch = kernel.w4a8(x[first : r + 1], packed, 192, 128)
            assert torch.equal(batch[-1], together[r])


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_bf16_inputs_give_the_fp32_products_rounded_to_bf16_bit_for_bit(
    kernel: W4A8Kernel, rows: int
) -> None:
    """A bf16 model's activations go in and come out as bf16 with no cast around the call: the
    same bits as widening them to fp32, the fp32 kernel, then ``.to(bfloat16)`` (NaN included)."""
    codes, scales, offsets = random_weights(200, 256, rows)
    packed = kernel.pack4(codes, scales, offsets)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).bfloat16()
    x[-1, 5] = float("nan")  # its row's outputs are NaN, as torch's cast writes them
    y = kernel.w4a8(x, packed, 200, 256)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 200)
    expected = kernel.w4a8(x.float(), packed, 200, 256).to(torch.bfloat16)
    assert torch.equal(y.view(torch.int16), expected.view(torch.int16))
    assert y[-1].isnan().all() and not y[:-1].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_leading_shape_and_strided_rows_give_the_rows_products(
    kernel: W4A8Kernel, dtype: torch.dtype
) -> None:
    codes, scales, offsets = random_weights(130, 96, 11)
    packed = kernel.pack4(codes, scales, offsets)
    wide = torch.randn(2, 3, 2 * 96, generator=torch.Generator().manual_seed(12)).to(dtype)
    x = wide[..., 96:]  # rows 192 apart: not one contiguous block
    y = kernel.w4a8(x, packed, 130, 96)
    assert y.shape == (2, 3, 130) and y.dtype == dtype
    rows = kernel.w4a8(x.reshape(-1, 96).contiguous(), packed, 130, 96)
    assert torch.equal(y.reshape(-1, 130), rows)


def test_scales_beyond_fp16_are_refused_not_stored_as_infinity(kernel: W4A8Kernel) -> None:
    codes, scales, offsets = random_weights(64, 64, 7)
    for bad in (70000.0, float("nan")):
        scales[3, 1] = bad
        with pytest.raises(ValueError, match="beyond fp16's range"):
            kernel.pack4(codes, scales, offsets)


@needs_avx2
@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True], ids=["offsets", "symmetric"])
def test_the_avx2_kernel_gives_the_avx512_kernels_bits(dtype: torch.dtype, symmetric: bool) -> None:
    """The same integer sums, scaled by the same two FMAs in the same order: a model on
    ``quant: w4a8`` answers the same on either CPU (at every row count each blocks its own),
    Q4_0's grid included, which the AVX2 kernel holds without its offsets."""
    avx512_kernel.load("w4a8")
    avx2_kernel.load("w4a8")
    codes, scales, offsets = random_weights(300, 576, 13, symmetric)
    x = torch.randn(11, 576, generator=torch.Generator().manual_seed(14)).to(dtype)
    x[2, 64:96] = 0
    wide = avx512_kernel.pack4(codes, scales, offsets)
    narrow = avx2_kernel.pack4(codes, scales, offsets)
    # one layout; the AVX2 kernel's symmetric form leaves the offsets out
    assert torch.equal(wide[..., : narrow.shape[-1]], narrow)
    assert narrow.shape[-1] == (1152 if symmetric else 1280)
    for rows in range(1, 12):
        a = avx512_kernel.w4a8(x[:rows], wide, 300, 576)
        b = avx2_kernel.w4a8(x[:rows], narrow, 300, 576)
        assert torch.equal(
            a.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
            b.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        )


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_symmetric_form_gives_the_full_layouts_bits(dtype: torch.dtype) -> None:
    """Q4_0's grid packed without offsets (each -8 scale, computed exactly in the kernel) gives
    the bits of the same weights with their offsets stored, at every row count, NaN included."""
    avx2_kernel.load("w4a8")
    codes, scales, offsets = random_weights(200, 256, 21, symmetric=True)
    short = avx2_kernel.pack4(codes, scales, offsets)
    full = torch.ops.tdllm_avx2.pack4(codes, scales, offsets)
    assert short.shape == (4, 8, 1152) and full.shape == (4, 8, 1280)
    x = torch.randn(9, 256, generator=torch.Generator().manual_seed(22)).to(dtype)
    x[1, :GROUP] = 0
    x[4, 100] = float("nan")
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for rows in range(1, 10):
        a = avx2_kernel.w4a8(x[:rows], short, 200, 256)
        b = avx2_kernel.w4a8(x[:rows], full, 200, 256)
        assert torch.equal(a.view(bits), b.view(bits))
    back = avx2_kernel.unpack4(short, 200, 256)
    assert torch.equal(back[0], codes) and torch.equal(back[2], offsets)


@needs_avx2
def test_an_offset_one_step_from_q4_0s_keeps_the_full_layout() -> None:
    """A host-chosen Q4_1 block whose minimum is -8 d but for one fp16 step: dropping offsets
    there would change its weights, so the layout keeps them and they read back exactly."""
    avx2_kernel.load("w4a8")
    codes, scales, offsets = random_weights(64, 64, 23, symmetric=True)
    near = offsets.half()
    near[5, 1] = torch.nextafter(near[5, 1], torch.tensor(0.0, dtype=torch.float16))
    packed = avx2_kernel.pack4(codes, scales, near.float())
    assert packed.shape[-1] == 1280
    assert torch.equal(avx2_kernel.unpack4(packed, 64, 64)[2], near.float())
    shape = avx2_kernel.w4a8(torch.ones(1, 64), packed, 64, 64).shape
    assert shape == (1, 64)


def test_a_host_chosen_weight_beyond_fp16s_scales_is_a_clear_load_error(kernel: W4A8Kernel) -> None:
    """A file's weights are the host's to choose (a Q4_K block's scales reach 63 x 65504): a
    group whose int4 step overflows fp16 fails the load with the layer's name, not an
    infinity in the kernel's weights."""
    weight = torch.zeros(64, 64)
    weight[5, 40] = 2e6  # a step of 2e6 / 15 in that group
    layer = Linear("layers.3.mlp.down_proj", 64, 64, Int4W4A8Method(kernel), torch.float32)
    with pytest.raises(ModelLoadError, match=r"^layers.3.mlp.down_proj: .*beyond fp16's range"):
        layer.load_weight(weight)


def test_q4_0_blocks_arrive_in_the_kernel_exactly(kernel: W4A8Kernel) -> None:
    """Q4_0's scale is fp16 and its offset -8 scale: the kernel's fp16 keeps both exactly, so its
    weights are gguf's own dequantization, bit for bit (the AVX2 kernel's from the scales alone:
    Q4_0's bytes, not 11% more)."""
    blocks = synthetic("Q4_0", 96, 256)
    layer = Linear("t", 256, 96, Int4W4A8Method(kernel), torch.float32)
    method = layer.method
    assert isinstance(method, Int4W4A8Method)
    method.load_blocks(layer, blocks)
    method.after_load(layer)
    codes, scales, offsets = kernel.unpack4(layer.qweight, 96, 256)
    assert np.array_equal(stored_weights(codes, scales, offsets).numpy(), gguf_float(blocks))
    assert layer.qweight.shape[-1] == (1152 if kernel is avx2_kernel else 1280)
    staged = [n for n, b in layer._buffers.items() if n.startswith("staged_") and b is not None]
    assert not staged  # dropped (and scrubbed) once packed


def test_float_rows_take_int4s_grid(kernel: W4A8Kernel) -> None:
    weight = torch.randn(80, 128) / 10
    layer = Linear("t", 128, 80, Int4W4A8Method(kernel), torch.float32)
    layer.load_weight(weight)
    codes, scales, offsets = kernel.unpack4(layer.qweight, 80, 128)
    q, s, z = int4_quantize(weight)
    assert torch.equal(codes, q.to(torch.uint8))
    assert torch.equal(scales, s.half().float())
    assert torch.equal(offsets, (z - 8 * s).half().float())
    x = torch.randn(3, 128)
    x[1, 40] = 50.0  # an outlier costs the precision of its own group of 32 only
    stored = codes.float().reshape(80, -1, GROUP) * scales[..., None] + offsets[..., None]
    # each input off by at most half its group's step: a bound on each output's error
    _, dx = rounded_inputs(x)
    bound = (dx / 2) @ stored.abs().sum(-1).T
    error = (layer(x) - x @ stored.reshape(80, 128).T).abs()
    assert bool((error <= bound * 1.001 + 1e-5).all()) and error.max() > 0


@pytest.mark.parametrize(
    "quant",
    [pytest.param("w4a8", marks=needs_avx2), pytest.param("w4a8-avx512", marks=needs_avx512)],
)
def test_the_model_runs_on_the_int4_kernel_near_int4_and_prefills_prompts_together(
    quant: str,
) -> None:
    """Same int4 weights, inputs rounded per 32: the logits stay near int4 weight-only's (the
    rounding's cost on the bundled model: `tdllm bench fidelity`, docs/performance.md)."""
    runs_near("int4", quant, 0.1)


@needs_avx512
@pytest.mark.parametrize(("n", "k", "first"), [(100, 64, 0), (130, 576, 64), (3072, 96, 1024)])
def test_a_prompts_widening_gives_the_stored_weights_in_bf16(n: int, k: int, first: int) -> None:
    avx512_kernel.load("w4a8-avx512")
    codes, scales, offsets = random_weights(n, k, n + k)
    packed = avx512_kernel.pack4(codes, scales, offsets)
    stored = codes.float().reshape(n, -1, GROUP) * scales.half().float()[..., None]
    stored = (stored + offsets.half().float()[..., None]).reshape(n, k)
    blocks = packed.shape[0] - first // 64
    wide = avx512_kernel.widen4(packed, k, first, blocks)
    assert wide.shape == (k, blocks * 64) and wide.dtype == torch.bfloat16
    assert torch.equal(wide[:, : n - first].T, stored[first:].bfloat16())  # round to nearest even
    assert not wide[:, n - first :].any()  # the padding outputs


@needs_avx512
def test_a_prompt_from_the_widening_threshold_runs_on_the_bf16_gemm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Below the threshold the VNNI kernel (inputs rounded to int8 per 32), from it oneDNN's
    bf16 GEMM on the widened weights, in blocks of `WIDEN_WEIGHTS` (here several)."""
    monkeypatch.setattr(avx512_kernel, "W4A8_WIDEN_MIN_ROWS", 4)
    monkeypatch.setattr(avx512_kernel, "WIDEN_WEIGHTS", 64 * 128 * 2)  # two blocks at a time
    weight = torch.randn(300, 128) / 10
    layer = Linear("t", 128, 300, Int4Avx512Method(), torch.float32)
    layer.load_weight(weight)
    codes, scales, offsets = avx512_kernel.unpack4(layer.qweight, 300, 128)
    stored = codes.float().reshape(300, -1, GROUP) * scales[..., None] + offsets[..., None]
    stored = stored.reshape(300, 128)
    x = torch.randn(5, 128)
    prompt = layer(x)
    exact = x.bfloat16().float() @ stored.bfloat16().float().T
    assert torch.allclose(prompt, exact, rtol=1e-2, atol=1e-2 * float(exact.abs().max()))
    assert torch.equal(layer(x[:3]), avx512_kernel.w4a8(x[:3], layer.qweight, 300, 128))
    assert not torch.equal(prompt[:3], layer(x[:3]))  # two paths, two roundings of the input
