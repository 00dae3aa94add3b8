"""int4 prefill on oneDNN's bf16 GEMM (tdllm.model.int4_widen): the codes read back from the
kernel's packed layout are the ones packed; the weights it dequantizes are the int4 kernel's own
weights rounded to bf16, bit for bit; a long prefill through it gives the kernel's product
within bf16 rounding, for float rows and GGUF blocks alike; the bundled model's greedy tokens do
not change."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from tdllm.model import int4_widen
from tdllm.model.gguf_blocks import GgufQuantized
from tdllm.model.int4_methods import Int4WeightOnlyMethod, int4_quantize
from tdllm.model.linear import Linear
from tdllm.model.loader import load_model
from tdllm.model.quantized import quant_table
from tdllm.model.staged_quant import KERNEL_DTYPE
from tdllm.model.transformer import Batch, KVCache, Transformer
from tdllm.sources import open_checkpoint

NEVER = 1 << 30  # a prefill threshold no input reaches: the kernel path, as before


@pytest.fixture(autouse=True)
def widening_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The widened path's numerics hold on any CPU; only its speed needs bf16 in hardware
    (without, `prefill_min_rows` never widens: tested below)."""
    monkeypatch.setattr(int4_widen, "HAS_NATIVE_BF16", True)


def kernel(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    """The int4 kernel itself on `x` (any number of rows), the padding rows cut."""
    y = torch._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE), layer.qweight, 32, layer.scales_zeros)
    return y[:, : layer.out_features]


def kernel_weight_t(layer: Linear) -> torch.Tensor:
    """Every weight the kernel multiplies by, ``[K, N']``: probed with the identity, the kernel
    rounds its fp32 weight ``(q - 8) * s + z`` to its bf16 output."""
    eye = torch.eye(layer.in_features, dtype=KERNEL_DTYPE)
    return torch._weight_int4pack_mm_for_cpu(eye, layer.qweight, 32, layer.scales_zeros)


def widened_weight_t(layer: Linear) -> torch.Tensor:
    """The widened path's weights ``[K, N']``, block by block as it makes them."""
    packed, sz = layer.qweight, layer.scales_zeros
    step = int4_widen.block_rows(layer.in_features)
    return torch.cat(
        [
            int4_widen.dequantize_t(packed, sz, 32, s, min(step, packed.shape[0] - s)).clone()
            for s in range(0, packed.shape[0], step)
        ],
        dim=1,
    )


def bf16_gemm_bound(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """How far the widened product may be from the kernel's. Each path's weight is the same fp32
    ``w`` (the kernel's) or ``bf16(w)`` (ours, <= 2^-9 |w| off); each rounds its output to bf16
    (<= 2^-9 |y| each, |y| <= S = |x| @ |w|); the fp32 sums differ in order (K * 2^-24 S).
    Hence (3 * 2^-9 + K * 2^-24) * S."""
    k = x.shape[1]
    s = x.to(KERNEL_DTYPE).float().abs() @ weight_t.float().abs()
    return (3 * 2**-9 + k * 2**-24) * s


def float_layer(rows: int, cols: int, seed: int = 0) -> Linear:
    gen = torch.Generator().manual_seed(seed)
    layer = Linear("t", cols, rows, Int4WeightOnlyMethod(), torch.float32)
    layer.load_weight(torch.randn(rows, cols, generator=gen) * 0.05 + 0.01)
    return layer


@pytest.mark.parametrize("rows", [16, 48, 64, 80, 208, 1008])
def test_codes_read_back_from_the_packed_layout_are_the_codes_packed(rows: int) -> None:
    # full tiles (64 rows with AVX-512, 32 below) and a shorter last one: both layouts
    weight = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
    q, _, _ = int4_quantize(weight)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    out = torch.empty(96, rows, dtype=torch.int32)
    int4_widen.unpack_codes_t(packed, 0, rows, out)
    assert torch.equal(out.T, q - 8)  # centred, as the kernel's weights are


@pytest.mark.parametrize("rows", [16, 48, 64, 80, 208, 1008])
def test_our_packing_is_torchs_byte_for_byte(rows: int) -> None:
    # the decode kernel reads what torch's packing writes: ours must write the same bytes
    codes = torch.randint(0, 16, (rows, 96), generator=torch.Generator().manual_seed(rows))
    ours = torch.empty(rows, 48, dtype=torch.uint8)
    int4_widen.pack_codes(codes.to(torch.uint8), ours)
    assert torch.equal(ours, torch._convert_weight_to_int4pack_for_cpu(codes.int(), 1))


# what this CPU runs, then each level ATen can be lowered to (its portable code pairs every tile)
@pytest.mark.parametrize("capability", [None, "default", "avx2"])
def test_packing_and_unpacking_follow_torchs_layout_at_each_cpu_capability(
    capability: str | None,
) -> None:
    # on a CPU without AVX-512 torch's tiles are 32 rows, not 64: packing the AVX-512 way fed
    # its kernel other weights (every int4 product wrong on such a CPU, found on an AVX2 EPYC)
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    script = """
import torch
from tdllm.model import int4_widen
for rows in (16, 48, 64, 80, 208, 1008):
    codes = torch.randint(0, 16, (rows, 96), generator=torch.Generator().manual_seed(rows))
    ours = torch.empty(rows, 48, dtype=torch.uint8)
    int4_widen.pack_codes(codes.to(torch.uint8), ours)
    assert torch.equal(ours, torch._convert_weight_to_int4pack_for_cpu(codes.int(), 1)), rows
    back = torch.empty(96, rows, dtype=torch.int32)
    int4_widen.unpack_codes_t(ours, 0, rows, back)
    assert torch.equal(back.T, codes - 8), rows
print(torch.backends.cpu.get_cpu_capability(), int4_widen.pack_layout())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    if capability == "default":
        assert "halves=False" in done.stdout


@pytest.mark.parametrize("rows", [200, 1000])
def test_the_widened_weights_are_the_kernels_weights_bit_for_bit(
    rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 64-row blocks: several, the last one the packing's short tile (200 -> 208 rows: 3x64 + 16)
    # on AVX-512, 32-row tiles below it (6x32 + 16)
    monkeypatch.setattr(int4_widen, "WIDEN_BLOCK_WEIGHTS", 64 * 96)
    layer = float_layer(rows, 96)
    assert int4_widen.block_rows(96) == 64
    assert torch.equal(widened_weight_t(layer), kernel_weight_t(layer))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_long_prefill_is_the_kernels_product_within_bf16_gemm_rounding(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(int4_widen, "WIDEN_BLOCK_WEIGHTS", 128 * 256)  # 3 blocks, the last short
    layer = float_layer(300, 256, seed=1)
    rows = int4_widen.PREFILL_MIN_ROWS
    x = torch.randn(2, rows // 2 + 3, 256, generator=torch.Generator().manual_seed(2)).to(dtype)
    flat = x.reshape(-1, 256)
    y = layer(x)
    assert y.shape == (2, rows // 2 + 3, 300) and y.dtype == dtype
    want = kernel(layer, flat).to(dtype)
    bound = bf16_gemm_bound(flat, kernel_weight_t(layer)[:, :300])
    assert torch.all((y.reshape(-1, 300).float() - want.float()).abs() <= bound)
    # below the threshold, the kernel as before, bit for bit
    short = flat[: rows - 1]
    assert torch.equal(layer(short), kernel(layer, short).to(dtype))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_blocks_loaded_straight_go_through_the_widened_path_with_their_own_weights(
    kind: str,
) -> None:
    gen = np.random.default_rng(3)
    if kind == "Q4_K":  # gguf only reads Q4_K: random bytes with finite fp16 d and dmin
        raw = gen.integers(0, 256, (144, 2, 144), dtype=np.uint8)
        raw[..., 0:4] = (gen.random((144, 2, 2)) * 0.004).astype(np.float16).view(np.uint8)
        blocks = GgufQuantized(kind, (144, 512), raw.reshape(144, -1))
    else:
        weight = (gen.standard_normal((144, 512)) * 0.05).astype(np.float32)
        blocks = GgufQuantized(kind, (144, 512), quantize(weight, GGMLQuantizationType[kind]))
    layer = Linear("t", 512, 144, Int4WeightOnlyMethod(), torch.float32, [96, 48])
    layer.method.load_blocks(layer, blocks.row_slice(96, 144), 96)  # type: ignore[attr-defined]
    layer.method.load_blocks(layer, blocks.row_slice(0, 96), 0)  # type: ignore[attr-defined]
    layer.method.after_load(layer)
    assert torch.equal(widened_weight_t(layer), kernel_weight_t(layer))
    x = torch.randn(int4_widen.PREFILL_MIN_ROWS + 5, 512)
    y = layer(x)
    weight_t = kernel_weight_t(layer)[:, :144].float()
    assert torch.all((y - kernel(layer, x).float()).abs() <= bf16_gemm_bound(x, weight_t))
    # and gguf's own weight, but for the bf16 rounding of scale and zero (<= 2^-8 each: the
    # `slack` of test_gguf_quant_load), of the weight and of the output (2^-9 S each)
    gguf = dequantize(blocks.blocks, GGMLQuantizationType[kind]).reshape(144, 512)
    xb = x.to(KERNEL_DTYPE).float()
    reference = xb @ torch.from_numpy(np.asarray(gguf, np.float32)).T
    _, d, offset = blocks.affine()
    assert offset is not None
    slack = torch.from_numpy((8 * np.abs(d) + np.abs(offset + 8 * d)) * 2**-8)
    bound = xb.abs() @ slack.repeat_interleave(32, dim=1).T + 2**-8 * xb.abs() @ weight_t.abs()
    assert torch.all((y - reference).abs() <= bound * (1 + 1e-5) + 1e-4)


@pytest.fixture(scope="module")
def bundled_int4() -> tuple[Transformer, list[int], list[int]]:
    checkpoint = open_checkpoint("bundled")
    model, _ = load_model(checkpoint, torch.bfloat16, quant_table("int4"))
    short = checkpoint.tokenizer.encode("The capital of France is")
    text = (
        "The history of the printing press begins in the fifteenth century, when Johannes "
        "Gutenberg combined movable metal type, oil-based ink and a wooden screw press. "
    )
    long = checkpoint.tokenizer.encode(text * 6)
    return model, short, long


def greedy(model: Transformer, prompt: list[int], new: int = 8) -> list[int]:
    cache = KVCache(model.cfg, 1, len(prompt) + new, torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), Batch([0], [0], len(prompt)), cache)
        out = [int(logits[0, -1].argmax())]
        for step in range(new - 1):
            batch = Batch([0], [len(prompt) + step], 1)
            out.append(int(model(torch.tensor([[out[-1]]]), batch, cache)[0, -1].argmax()))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["short", "long"])
def test_bundled_int4_greedy_tokens_are_unchanged_by_the_widened_prefill(
    bundled_int4: tuple[Transformer, list[int], list[int]],
    prompt: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, short, long = bundled_int4
    tokens = short if prompt == "short" else long
    # the short prompt's prefill is widened by lowering the threshold below its length; the
    # long one reaches the real threshold. Decode (one row) takes the kernel either way.
    threshold = 2 if prompt == "short" else int4_widen.PREFILL_MIN_ROWS
    assert len(tokens) >= threshold
    monkeypatch.setattr(int4_widen, "PREFILL_MIN_ROWS", NEVER)
    before = greedy(model, tokens)
    monkeypatch.setattr(int4_widen, "PREFILL_MIN_ROWS", threshold)
    assert greedy(model, tokens) == before


def test_nothing_widens_to_bf16_where_the_cpu_has_no_bf16_arithmetic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An AVX2 EPYC: torch's bf16 GEMM ran a 512-row prompt through one 1B-wide layer in 16 s
    (a scalar loop), int4's kernel in 53 ms; int8's widening likewise lost to its kernel."""
    monkeypatch.setattr(int4_widen, "HAS_NATIVE_BF16", False)
    assert int4_widen.prefill_min_rows(2048, 8192) == int4_widen.NEVER
    layer = float_layer(300, 256, seed=4)
    x = torch.randn(int4_widen.PREFILL_MIN_ROWS + 3, 256)
    assert torch.equal(layer(x), kernel(layer, x))  # the kernel's product, bit for bit
    script = (
        "import tdllm.model.cpu_features as f, tdllm.model.int8_methods as m; "
        "print(m.PREFILL_MIN_ROWS, f.HAS_NATIVE_BF16, f.HAS_AMX)"
    )
    threshold, native, amx = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    if native == "False":
        assert int(threshold) == int4_widen.NEVER
    else:
        assert int(threshold) == (16 if amx == "True" else 128)


@pytest.mark.parametrize("amx", [True, False])
def test_only_wide_layers_widen_early_and_only_where_onednn_has_amx(
    amx: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # measured: with AMX a 1B-wide layer passes the kernel at ~56 rows, the bundled model's
    # narrow ones not yet at 64; without AMX every shape from ~128
    monkeypatch.setattr(int4_widen, "HAS_AMX", amx)
    assert int4_widen.prefill_min_rows(2048, 8192) == (64 if amx else 128)  # 1B up
    assert int4_widen.prefill_min_rows(576, 3072) == 128  # bundled gate|up
