"""vLLM's CPU build as a shape-bench peer, the parts that need no vLLM: the Hugging Face twin of a
synthetic GGUF is the same model (transformers on the twin = our engine on the GGUF), its W8A8
form rounds each weight within half a step, the writer resumes cleanly, and the rows, memory
estimates and ratios carry vLLM. The worker against a real vLLM is tests/vllm/test_vllm_peer.py.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tdllm.errors import UsageError
from tdllm.sources import open_checkpoint
from tdllm_lab.bench import shape_bench, vllm_peer
from tdllm_lab.bench.synthetic_shapes import SHAPES, Shape, ensure_gguf

TINY = Shape("tiny", hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, vocab=320, tied=True)
TINY_UNTIED = Shape("tiny-untied", 64, 1, 4, 2, 96, 300, tied=False)


def twin_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(str(file))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)  # the index names every tensor, once
    return tensors


@pytest.mark.parametrize("shape", [TINY, TINY_UNTIED], ids=lambda s: s.name)
def test_the_bf16_twin_is_the_same_model_as_the_gguf(shape: Shape, tmp_path: Path) -> None:
    """transformers on the twin and transformers on the GGUF (its own reader) give the same
    logits up to bf16 rounding: same weights, same rotary layout (GGUF permutes q/k rows; a
    twin written without undoing that would give unrelated logits)."""
    from transformers import LlamaForCausalLM

    gguf = ensure_gguf(shape.name, "f16", tmp_path, shape=shape, progress=False)
    twin = vllm_peer.ensure_checkpoint(gguf, "f16", lambda _: None)
    assert twin == vllm_peer.checkpoint_dir(gguf, "f16") and (twin / vllm_peer.DONE).is_file()
    theirs = LlamaForCausalLM.from_pretrained(str(twin), dtype=torch.float32).eval()
    assert theirs.config.tie_word_embeddings is shape.tied
    reference = LlamaForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([[5, 17, 200, 3, 99, 42, 7, 110]])
    with torch.inference_mode():
        got, want = theirs(ids).logits[0], reference(ids).logits[0]
    assert got.shape == (ids.shape[1], shape.vocab)
    assert (got - want).abs().max() < 0.01 * want.abs().max()


def test_the_w8a8_twin_rounds_each_weight_within_half_a_step(tmp_path: Path) -> None:
    gguf = ensure_gguf("tiny", "q8_0", tmp_path, shape=TINY, progress=False)
    twin = vllm_peer.ensure_checkpoint(gguf, "q8_0", lambda _: None)
    tensors = twin_tensors(twin)
    source = dict(open_checkpoint(str(gguf)).tensors())
    projections = [n for n in source if n.endswith("_proj.weight")]
    assert len(projections) == 7 * TINY.layers
    for name in projections:
        q, scale = tensors[name], tensors[name.removesuffix("weight") + "weight_scale"]
        assert q.dtype == torch.int8 and scale.shape == (q.shape[0], 1)
        assert (q.float() * scale - source[name].float()).abs().max() <= scale.max() / 2 + 1e-7
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16  # vLLM keeps it bf16
    config = json.loads((twin / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and not group["weights"]["dynamic"]
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True,
                                          "strategy": "token", "dynamic": True}  # fmt: skip


def test_an_interrupted_twin_is_written_again_and_a_whole_one_is_reused(tmp_path: Path) -> None:
    gguf = ensure_gguf("tiny", "f16", tmp_path, shape=TINY, progress=False)
    out = vllm_peer.checkpoint_dir(gguf, "f16")
    out.mkdir()
    (out / "model-00001.safetensors").write_bytes(b"half a file")  # no config.json: interrupted
    messages: list[str] = []
    assert vllm_peer.ensure_checkpoint(gguf, "f16", messages.append) == out
    assert len(messages) == 1 and "written once" in messages[0]
    assert twin_tensors(out)  # a whole, readable checkpoint now
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert vllm_peer.ensure_checkpoint(gguf, "f16", messages.append) == out
    assert len(messages) == 1 and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
    assert not list(tmp_path.glob("*.partial"))


def test_the_worker_runs_offline_in_its_own_caches_with_the_benchs_threads(tmp_path: Path) -> None:
    env = vllm_peer.environment(1, tmp_path)
    first = min(os.sched_getaffinity(0))
    assert env["OMP_NUM_THREADS"] == "1" and env["VLLM_CPU_OMP_THREADS_BIND"] == f"{first}-{first}"
    assert vllm_peer.thread_binding(2, [2, 3, 5]) == "2-3"  # a cpuset that starts at 2
    assert vllm_peer.thread_binding(3, [0, 1, 4]) == "auto"  # not a range: vLLM chooses
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # peak RSS is the worker's own
    assert all(env[k].startswith(str(tmp_path)) for k in ("HOME", "VLLM_CACHE_ROOT", "TMPDIR"))
    seen: dict[str, object] = {}

    def fake_run(cmd: list[str], **kwargs: object) -> str:
        seen.update(kwargs, cmd=cmd)
        return "done"

    out = vllm_peer.measure(Path("/py"), tmp_path, {1: [[1, 2]], 8: [[3]] * 8}, 2, ["--x"],
                            fake_run)  # fmt: skip
    assert out == "done" and seen["cmd"][:2] == ["/py", str(Path(vllm_peer.__file__).resolve())]
    assert json.loads(str(seen["input"])) == {"1": [[1, 2]], "8": [[3]] * 8}
    assert not Path(str(seen["env"]["VLLM_CACHE_ROOT"])).parent.exists()  # type: ignore[index]


def test_a_format_vllm_does_not_run_and_a_missing_vllm_are_rows_that_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = ensure_gguf("tiny", "q4_0", tmp_path, shape=TINY, progress=False)
    row = shape_bench._run_one("vllm-cpu", gguf, "q4_0", "bf16", 8, 2, 1, 1, (1,))
    assert row == {"engine": "vllm-cpu", "format": "q4_0", "status": vllm_peer.UNSUPPORTED}
    monkeypatch.setenv("TDLLM_VLLM_PYTHON", str(tmp_path / "no-such-python"))
    row = shape_bench._run_one("vllm-cpu", gguf, "f16", "bf16", 8, 2, 1, 1, (1,))
    assert row["status"] == vllm_peer.NOT_INSTALLED
    assert not vllm_peer.checkpoint_dir(gguf, "f16").exists()  # nothing written for nothing


def test_vllms_memory_and_decode_bytes_count_its_bf16_head() -> None:
    one_b = SHAPES["1b"]
    head = one_b.vocab * one_b.hidden * 2
    bf16, w8a8 = (shape_bench.vllm_decode_bytes(one_b, f) for f in ("f16", "q8_0"))
    assert bf16 == pytest.approx(2 * one_b.parameters(), rel=0.001)
    assert w8a8 == pytest.approx((one_b.parameters() - one_b.vocab * one_b.hidden) + head,
                                 rel=0.001)  # fmt: skip
    assert shape_bench.peer_decode_bytes(one_b, "vllm-cpu", "q8_0") == w8a8
    need = shape_bench.memory_needed(one_b, "q8_0", 256)
    assert need["vllm-cpu"] > w8a8 + shape_bench.VLLM_RUNTIME_BYTES
    assert set(shape_bench.ENGINES) == set(need)  # every engine has its row
    compiler = shape_bench.COMPILER_BYTES
    assert need["ours-compiled-w8a8"] == need["ours-w8a8"] + compiler == need["ours"] + compiler
    assert shape_bench.memory_needed(one_b, "q4_0", 256)["vllm-cpu"] == 0  # it does not run
    with pytest.raises(UsageError, match="needs about"):
        shape_bench.check_resources("1b", ["f16"], ("ours", "vllm-cpu"), 256, Path("/tmp"),
                                    available=int(4e9))  # fmt: skip


def test_ratios_against_vllm_include_batch_8() -> None:
    rows = [
        {"engine": "ours-w8a8", "format": "q8_0", "prefill_tok_s": 100.0,
         "decode_b1_tok_s": 30.0, "decode_b8_tok_s": 160.0, "peak_rss_mb": 1000.0},
        {"engine": "vllm-cpu", "format": "q8_0", "prefill_tok_s": 200.0,
         "decode_b1_tok_s": 20.0, "decode_b8_tok_s": 80.0, "peak_rss_mb": 2000.0},
        {"engine": "llama.cpp", "format": "q8_0", "prefill_tok_s": 50.0,
         "decode_b1_tok_s": 30.0, "peak_rss_mb": 1000.0},
    ]  # fmt: skip
    assert shape_bench.peer_ratios(rows, vllm_peer.ENGINE) == {
        "q8_0 w8a8": {"prefill_tok_s": 0.5, "decode_b1_tok_s": 1.5, "decode_b8_tok_s": 2.0,
                      "peak_rss_mb": 2.0}
    }  # fmt: skip
    assert "decode_b8_tok_s" not in shape_bench.peer_ratios(rows)["q8_0 w8a8"]
    report = {
        "shape": {"key": "1b", "name": "Llama-3.2-1B", "parameters": 1.2e9},
        "settings": {"threads": 2, "prompt_tokens": 128, "new_tokens": 64},
        "read_gb_s": 10.0, "peer": "0.3.36", "results": rows,
        "ratios": shape_bench.peer_ratios(rows),
        "vllm_ratios": shape_bench.peer_ratios(rows, vllm_peer.ENGINE),
    }  # fmt: skip
    table = shape_bench.format_shape_table(report)
    assert "ratio tdllm/vLLM (q8_0 w8a8, >1 is better): prefill_tok_s 0.5" in table


def test_the_disk_check_counts_vllms_twins_not_yet_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_b = SHAPES["1b"]
    file = shape_bench.file_bytes(one_b, "f16")
    monkeypatch.setattr(shape_bench.shutil, "disk_usage", lambda _: SimpleNamespace(free=file + 1))
    check = functools.partial(shape_bench.check_resources, "1b", ["f16"], max_tokens=256,
                              folder=tmp_path, available=int(100e9))  # fmt: skip
    check(("ours", "llama.cpp"))
    with pytest.raises(UsageError, match=r"f16, f16 \(vLLM's twin\) needs 4\.9 GB on disk"):
        check(("ours", "vllm-cpu"))


def test_a_decode_pair_the_host_disturbed_is_measured_again_never_a_negative_rate() -> None:
    # one repeat on a loaded host: the one-token run outlasted the whole one (a CI run's vLLM
    # row had a decode rate <= 0 from exactly this); the pair is timed again
    firsts = iter([0.30, 0.30, 0.01])
    wholes = iter([0.20, 0.25, 0.05])
    assert vllm_peer.decode_seconds(lambda: next(firsts), lambda: next(wholes), 1) == 0.04
    with pytest.raises(RuntimeError, match="below the timing noise in 3 tries"):
        vllm_peer.decode_seconds(lambda: 0.3, lambda: 0.2, 2, tries=3)
    # undisturbed pairs: the median of their differences
    wholes = iter([0.5, 0.3, 0.9])
    assert vllm_peer.decode_seconds(lambda: 0.1, lambda: next(wholes), 3) == pytest.approx(0.4)
