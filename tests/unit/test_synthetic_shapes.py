"""`tdllm bench --shape`: the synthetic GGUF writer (a tiny shape: our loader reads the file back
as written, in every format, and the model generates), the real shapes' sizes, the memory check
and the CLI's one-line errors. llama.cpp itself is not needed here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from tdllm.cli import main
from tdllm.engine import Engine, SamplingParams
from tdllm.errors import UsageError
from tdllm.model.gguf_blocks import rope_row_order
from tdllm.model.loader import load_model
from tdllm.model.quantized import quant_table
from tdllm.sources import open_checkpoint
from tdllm_lab.bench import bandwidth, llama_cpp_peer, shape_bench, synthetic_shapes
from tdllm_lab.bench.commands import bench
from tdllm_lab.bench.synthetic_shapes import FORMATS, SHAPES, Shape, ensure_gguf, tensor_type

TINY = Shape("tiny", hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, vocab=320, tied=True)
TINY_UNTIED = Shape("tiny-untied", 64, 1, 4, 2, 96, 300, tied=False)


def expected_tensors(shape: Shape, fmt: str, seed: int) -> dict[str, np.ndarray]:
    """What the writer drew, through gguf's own quantize/dequantize (same draw order)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, dims in shape.tensors():
        qtype = GGMLQuantizationType[tensor_type(name, fmt)]
        rows = list(synthetic_shapes._chunks(rng, name, dims))
        floats = np.concatenate(rows) if len(dims) == 2 else rows[0]
        out[name] = dequantize(quantize(floats, qtype), qtype).reshape(dims).astype(np.float32)
    return out


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_reads_back_as_written(
    fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(synthetic_shapes, "CHUNK_ROWS", 48)  # several chunks per tensor
    path = ensure_gguf("tiny", fmt, tmp_path, seed=3, shape=TINY, progress=False)
    checkpoint = open_checkpoint(path)
    config = checkpoint.config
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads) == (
        64,
        2,
        4,
        2,
    )
    assert (config.intermediate_size, config.vocab_size, config.head_dim) == (96, 320, 16)
    assert config.tie_word_embeddings and config.rope_theta == 500000.0
    assert checkpoint.tokenizer.vocab_size == 320
    assert checkpoint.tokenizer.eos_token_id == 319
    assert len(checkpoint.tokenizer.encode("A trust domain keeps the memory")) > 3

    want = expected_tensors(TINY, fmt, seed=3)
    got = dict(checkpoint.tensors())
    for name, dims in TINY.tensors():
        expected = want[name]
        if ".attn_q." in name or ".attn_k." in name:  # our reader undoes llama.cpp's rope order
            heads = TINY.heads if ".attn_q." in name else TINY.kv_heads
            expected = expected[rope_row_order(dims[0], heads)]
        hf_name = next(n for n in got if _same(n, name))
        np.testing.assert_array_equal(got[hf_name].numpy(), expected, err_msg=name)


def _same(hf_name: str, gguf_name: str) -> bool:
    from tdllm.model.checkpoint import _hf_name

    return _hf_name(gguf_name) == hf_name


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_loads_into_its_kernels_and_generates(fmt: str, tmp_path: Path) -> None:
    path = ensure_gguf("tiny-untied", fmt, tmp_path, shape=TINY_UNTIED, progress=False)
    quant = FORMATS[fmt][2]
    model, checkpoint = load_model(open_checkpoint(path), torch.bfloat16, quant_table(quant))
    assert not checkpoint.config.tie_word_embeddings
    engine = Engine(model, checkpoint.tokenizer, max_batch=2, max_seq_len=32)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    out = engine.generate([[5, 6, 7], [8, 9]], params)
    assert len(out) == 2


def test_a_cached_file_is_reused_and_another_seed_is_another_file(tmp_path: Path) -> None:
    first = ensure_gguf("tiny", "q4_0", tmp_path, shape=TINY, progress=False)
    stamp = first.stat().st_mtime_ns
    assert ensure_gguf("tiny", "q4_0", tmp_path, shape=TINY, progress=False) == first
    assert first.stat().st_mtime_ns == stamp
    other = ensure_gguf("tiny", "q4_0", tmp_path, seed=1, shape=TINY, progress=False)
    assert other != first and not list(tmp_path.glob("*.tmp*"))


def test_the_real_shapes_have_their_models_sizes() -> None:
    assert SHAPES["135m"].parameters() == pytest.approx(134.5e6, rel=0.01)
    assert SHAPES["1b"].parameters() == pytest.approx(1.236e9, rel=0.005)
    assert SHAPES["8b"].parameters() == pytest.approx(8.03e9, rel=0.005)
    assert SHAPES["1b"].tied and not SHAPES["8b"].tied
    vocab, merges, types = synthetic_shapes.synthetic_vocab(128256)
    assert len(vocab) == len(types) == 128256 and merges and types[-2:] == [3, 3]


def test_decode_bytes_per_format() -> None:
    one_b = SHAPES["1b"]
    f16 = synthetic_shapes.decode_bytes(one_b, "f16")
    assert f16 == pytest.approx(2 * one_b.parameters(), rel=0.001)  # tied: the head reads it all
    assert synthetic_shapes.decode_bytes(one_b, "q4_0") < 0.4 * f16
    assert shape_bench.ours_decode_bytes(one_b, "int4") < shape_bench.ours_decode_bytes(
        one_b, "int8"
    )


def test_a_shape_that_does_not_fit_is_refused_with_the_numbers(tmp_path: Path) -> None:
    engines = ("ours", llama_cpp_peer.ENGINE)
    shape_bench.check_resources("8b", ["q4_0"], engines, 200, tmp_path, available=int(23e9))
    with pytest.raises(UsageError, match=r"8b .* in f16 needs about \d+\.\d GB .* 12\.0 GB are"):
        shape_bench.check_resources("8b", ["f16"], engines, 200, tmp_path, available=int(12e9))


def test_cli_errors_are_one_line_and_non_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, message in (
        (["bench", "--shape", "70b"], "unknown shape '70b'"),
        (["bench", "--shape", "1b", "--format", "q2_k"], "unknown format 'q2_k'"),
        (["bench", "--format", "q4_0"], "add --shape"),
        (["bench", "--engine", "llama.cpp"], "add --shape"),
        (["bench", "--shape", "1b", "--quant", "int4"], "leave out --model"),
        (["bench", "--shape", "1b", "--batch-sizes", "1,x"], "--batch-sizes '1,x': comma-"),
        (["bench", "--engine", "ours-w8a8"], "add --shape"),
        (["bench", "--engine", "vllm-cpu"], "add --shape"),
        (["bench", "linear-kernels", "--rows", "8,0"], "--rows '8,0': each at least 1"),
    ):
        with pytest.raises(SystemExit) as done:
            main(argv)
        err = capsys.readouterr().err
        assert done.value.code != 0 and message in err and err.count("\n") == 1, (argv, err)

    monkeypatch.setattr(shape_bench, "available_memory", lambda: int(2e9))
    with pytest.raises(SystemExit) as done:
        main(["bench", "--shape", "8b", "--format", "q4_0"])
    err = capsys.readouterr().err
    assert done.value.code != 0 and err.count("\n") == 1
    assert "needs about" in err and "2.0 GB are available" in err


def test_ratios_and_the_missing_peer_row() -> None:
    results = [
        {"engine": "ours", "format": "q4_0", "prefill_tok_s": 30.0, "decode_b1_tok_s": 6.0,
         "peak_rss_mb": 1000.0},
        {"engine": "llama.cpp", "format": "q4_0", "prefill_tok_s": 60.0, "decode_b1_tok_s": 4.0,
         "peak_rss_mb": 1500.0},
        {"engine": "ours", "format": "f16", "prefill_tok_s": 1.0, "decode_b1_tok_s": 1.0,
         "peak_rss_mb": 1.0},
        {"engine": "llama.cpp", "format": "f16", "status": llama_cpp_peer.NOT_INSTALLED},
    ]  # fmt: skip
    ratios = shape_bench.peer_ratios(results)
    assert ratios == {"q4_0": {"prefill_tok_s": 0.5, "decode_b1_tok_s": 1.5, "peak_rss_mb": 1.5}}
    report = {
        "shape": {"key": "1b", "name": "Llama-3.2-1B", "parameters": 1.2e9},
        "settings": {"threads": 2, "prompt_tokens": 128, "new_tokens": 64},
        "read_gb_s": 10.0,
        "peer": "0.3.36",
        "results": results,
        "ratios": ratios,
    }
    table = shape_bench.format_shape_table(report)
    assert "not installed (make bench-peers)" in table
    assert "ratio tdllm/llama.cpp (q4_0" in table


def test_the_bench_command_offers_every_shape_engine() -> None:
    # the command lists them itself (importing the shape bench would slow every `tdllm` call)
    option = next(p for p in bench.params if p.name == "engines")
    assert set(shape_bench.ENGINES) <= set(option.type.choices)  # type: ignore[attr-defined]


def test_ours_w8a8_runs_only_the_q8_0_file_and_has_its_own_ratios(tmp_path: Path) -> None:
    assert shape_bench.ours_quant("ours-w8a8", "q8_0") == "w8a8"
    assert shape_bench.ours_quant("ours-compiled", "q8_0") == "int8"
    skipped = shape_bench._run_one("ours-w8a8", tmp_path / "absent.gguf", "q4_0", "bf16", 4, 2,
                                   1, 2, (1,))  # fmt: skip
    assert skipped["status"] == "w8a8 runs the q8_0 file only"
    assert shape_bench.ours_quant("ours-compiled-w8a8", "q8_0") == "w8a8"
    assert shape_bench._run_one("ours-compiled-w8a8", tmp_path / "absent.gguf", "q4_0", "bf16",
                                4, 2, 1, 2, (1,))["status"] == skipped["status"]  # fmt: skip
    assert shape_bench.ours_quant("ours-w8a8-onednn", "q8_0") == "w8a8-onednn"
    onednn = shape_bench._run_one("ours-w8a8-onednn", tmp_path / "absent.gguf", "f16", "bf16",
                                  4, 2, 1, 2, (1,))  # fmt: skip
    assert onednn["status"] == "w8a8-onednn runs the q8_0 file only"
    assert shape_bench.ours_quant("ours-w4a8-avx512", "q4_0") == "w4a8-avx512"
    w4a8 = shape_bench._run_one("ours-compiled-w4a8-avx512", tmp_path / "absent.gguf", "q8_0",
                                "bf16", 4, 2, 1, 2, (1,))  # fmt: skip
    assert w4a8["status"] == "w4a8-avx512 runs the q4_0 file only"
    rows = [
        {"engine": engine, "format": "q8_0", "prefill_tok_s": 2.0 * speed,
         "decode_b1_tok_s": speed, "peak_rss_mb": 100.0}
        for engine, speed in (("ours", 1.0), ("ours-w8a8", 3.0), ("llama.cpp", 2.0))
    ]  # fmt: skip
    rows += [skipped, {"engine": "llama.cpp", "format": "q4_0", "prefill_tok_s": 1.0,
                       "decode_b1_tok_s": 1.0, "peak_rss_mb": 1.0}]  # fmt: skip
    ratios = shape_bench.peer_ratios(rows)
    assert list(ratios) == ["q8_0", "q8_0 w8a8"]  # the skipped q4_0 row has none
    assert ratios["q8_0"]["decode_b1_tok_s"] == 0.5
    assert ratios["q8_0 w8a8"]["decode_b1_tok_s"] == 1.5


def test_our_bus_share_uses_the_bytes_our_model_holds_and_a_peers_its_files() -> None:
    one_b = shape_bench.shape_named("1b")
    ours = {"engine": "ours-w4a8", "decode_b1_tok_s": 20.0, "decode_weight_bytes": 800_000_000}
    shape_bench.add_bus_share(ours, one_b, "ours-w4a8", "q4_0", 32.0)
    assert ours == {"engine": "ours-w4a8", "decode_b1_tok_s": 20.0, "decode_weight_gb": 0.8,
                    "bandwidth_share": 0.5}  # fmt: skip
    peer = {"engine": "llama.cpp", "decode_b1_tok_s": 20.0}
    shape_bench.add_bus_share(peer, one_b, "llama.cpp", "q4_0", 32.0)
    assert peer["decode_weight_gb"] == round(synthetic_shapes.decode_bytes(one_b, "q4_0") / 1e9, 3)


@pytest.mark.skipif(not llama_cpp_peer.available(), reason="llama-cpp-python not installed")
def test_llama_cpp_runs_the_same_file(tmp_path: Path) -> None:
    path = ensure_gguf("tiny", "q8_0", tmp_path, shape=TINY, progress=False)
    row = llama_cpp_peer.run(str(path), threads=1, prompt_len=8, new_tokens=4, repeats=1)
    assert row["prefill_tok_s"] > 0 and row["decode_b1_tok_s"] > 0


def test_the_sealed_load_times_both_fresh_loads(tmp_path: Path) -> None:
    from tdllm_lab.bench.shape_sealed import sealed_load

    path = ensure_gguf("tiny", "f16", tmp_path, shape=TINY, progress=False)
    load = sealed_load(path, lambda _: None, repeats=1, tmp_root=tmp_path)
    assert load["plain_s"] > 0 and load["sealed_s"] > 0 and load["sealed_bytes"] > 0
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary folder is gone


def test_peak_rss_is_this_processs_own() -> None:
    from tdllm_lab.bench.machine import peak_rss_mb

    held = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB touched
    assert peak_rss_mb() >= 64 and held.sum() == 64 << 20


def test_a_failed_worker_is_a_row_of_its_own_and_says_why(tmp_path: Path) -> None:
    """One engine's crash (llama.cpp's AMX path died of SIGSEGV on an Intel Xeon) costs its row,
    not the run: a real worker on a file that is not a GGUF fails, the row says why."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    row = shape_bench._run_one("ours", broken, "q8_0", "bf16", 8, 2, 1, 1, (1,))
    assert row["engine"] == "ours" and row["format"] == "q8_0"
    assert row["status"].startswith(shape_bench.WORKER_FAILED + ": ") and "\n" not in row["status"]
    assert row["status"] == f"{shape_bench.WORKER_FAILED}: {row['failure']}"
    report = {"results": [row, {"engine": "llama.cpp", "format": "q8_0", "prefill_tok_s": 1.0}]}
    assert shape_bench.failed_workers(report) == [f"ours/q8_0: {row['failure']}"]
    assert shape_bench.failure(-11, "") == "killed by SIGSEGV"
    assert shape_bench.failure(-9, "loading\n") == "killed by SIGKILL (loading)"
    assert shape_bench.failure(1, "") == "exit status 1"


def test_the_bandwidth_probe_runs_both_readers_and_reports_the_faster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    speeds = bandwidth.readers(8 << 20, repeats=2)
    assert set(speeds) == {"sum", "gemv"}
    assert all(0 < s < float("inf") for s in speeds.values())
    # the limit is the faster read: a decode step's share of a slower one would overstate it
    seconds = iter([0.004, 0.002])  # the sum, then the GEMV
    monkeypatch.setattr(bandwidth, "_best", lambda read, repeats: next(seconds))
    assert bandwidth.read_gb_s(8 << 20) == pytest.approx((8 << 20) / 0.002 / 1e9)
