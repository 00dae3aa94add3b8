"""The quantization benches: the kernel table covers every variant, and the engine bench's
quantized/unquantized ratios compare like with like."""

from __future__ import annotations

from pathlib import Path

import torch

from tdllm.model import avx2_kernel, avx512_kernel
from tdllm.model.int8_methods import int8_quantize
from tdllm_lab.bench import linear_kernels
from tdllm_lab.bench.engine_bench import format_table, quant_ratios
from tests.cpu_kernels import needs_vnni


def test_kernel_bench_times_every_variant_at_each_row_count() -> None:
    with torch.no_grad():
        results = linear_kernels.time_shape("tiny", 64, 32, (1, 8), calls=5, cache_bytes=1 << 16)
    variants = {r["variant"] for r in results}
    assert {"fp32", "bf16", "int8 (bf16 act)", "int4 g32 (bf16 act)"} <= variants
    if not avx512_kernel.missing_cpu_flags():  # our kernel beside FBGEMM's and oneDNN's
        assert {
            linear_kernels.W8A8,
            linear_kernels.W8A8_AVX512,
            linear_kernels.W4A8_AVX512,
            linear_kernels.W4A8_WIDENED,
        } <= variants
    if not avx2_kernel.missing_cpu_flags():  # and our AVX2 ones (every x86-64 server CPU)
        assert {linear_kernels.W4A8_AVX2, linear_kernels.W8A8_AVX2} <= variants
    assert all(r["us"] > 0 and r["weight_gb_s"] > 0 and r["copies"] >= 2 for r in results)
    report = {"threads": 1, "results": results}
    assert "tiny 64->32 x8" in linear_kernels.format_report(report)


def test_kernel_bench_cycles_copies_that_cover_the_cache_twice() -> None:
    nbytes = 64 * 32 * 4  # the fp32 copy
    with torch.no_grad():
        results = linear_kernels.time_shape("tiny", 64, 32, (1,), calls=5, cache_bytes=40 * nbytes)
    fp32 = next(r for r in results if r["variant"] == "fp32")
    assert fp32["copies"] == 80


def test_last_level_cache_is_the_largest_size_sysfs_reports(tmp_path: Path) -> None:
    for index, size in enumerate(["48K", "2048K", "491520K", "junk"]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert linear_kernels.last_level_cache_bytes(tmp_path) == 491520 << 10
    empty = tmp_path / "none"
    assert linear_kernels.last_level_cache_bytes(empty) == linear_kernels.FALLBACK_CACHE_BYTES


def test_quant_ratios_divide_by_the_same_dtype_unquantized() -> None:
    def row(dtype: str, quant: str, speed: float) -> dict[str, object]:
        metrics = ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s", "ttft_s", "peak_rss_mb")
        return {"engine": "ours", "dtype": dtype, "quant": quant, "load_s": 1.0} | dict.fromkeys(
            metrics, speed
        )

    results = [row("bf16", "none", 10.0), row("bf16", "int8", 15.0), row("fp32", "none", 5.0)]
    ratios = quant_ratios(results)
    assert list(ratios) == ["bf16 int8"]
    assert ratios["bf16 int8"]["decode_b1_tok_s"] == 1.5
    assert ratios["bf16 int8"]["peak_rss_mb"] == round(10 / 15, 2)  # costs: less is better
    table = format_table({"results": results, "quant_ratios": ratios})
    assert "ratio quantized/unquantized (bf16 int8" in table


@needs_vnni
def test_the_onednn_w8a8_candidate_computes_our_w8a8_product() -> None:
    """The kernel bench's oneDNN W8A8 is the same product as our FBGEMM method: each row on
    its own grid, so a row's result does not depend on its batch, and both land within the
    rounding of the activations of the float product."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(96, 128, generator=gen) * 0.05
    x = torch.randn(8, 128, generator=gen)
    x[3] *= 1e4  # an outlier row beside the others
    q, scales = int8_quantize(weight)
    operands = linear_kernels.onednn_w8a8_operands(q, scales.float())
    ours = linear_kernels.onednn_w8a8(x, *operands)
    alone = linear_kernels.onednn_w8a8(x[:1], *operands)
    assert torch.equal(ours[:1], alone)
    with torch.no_grad():
        fbgemm = linear_kernels._quant_layer(weight)(x.bfloat16()).float()
    exact = x @ (q.float() * scales.float()[:, None]).T
    step = x.abs().amax(dim=1, keepdim=True) / 127  # one rounding step of each row
    bound = step * (q.float() * scales.float()[:, None]).abs().sum(dim=1)
    assert ((ours - exact).abs() <= bound / 2 + 1e-4).all()
    assert ((ours - fbgemm).abs() <= bound + exact.abs() * 0.01).all()  # fbgemm: bf16 in/out
