"""The compiled decode step through W8A8 projections (`quant: w8a8` and w8a8-avx512, and int4's
head): the packed weights are opaque to a graph, so the step reaches them through the
``tdllm::w8a8_linear`` custom op, and gives the eager engine's tokens. Likewise our int4 kernel
(`quant: w4a8`, `w4a8-avx512`), an op of its own with a fake for the graph; on AVX2, the int8
head too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from tdllm.engine import Engine
from tdllm.errors import ModelLoadError
from tdllm.model import compiled_decode
from tdllm.model.compiled_decode import CACHE_DIR_ENV
from tdllm.model.quantized import quant_table
from tests.cpu_kernels import needs_avx2, needs_avx512, needs_vnni
from tests.protection.engine_runs import NoTokenizer
from tests.tiny_model import tiny_model
from tests.unit.test_compiled_decode import run


@pytest.mark.slow  # a compile of its own (~20 s on 2 cores)
@pytest.mark.parametrize(
    ("quant", "mode"),
    [
        pytest.param("w8a8", "decode", marks=needs_vnni),
        pytest.param("w8a8-avx512", "decode", marks=needs_avx512),
        *(pytest.param("w4a8-avx512", m, marks=needs_avx512) for m in ("decode", "decode-groups")),
        *(pytest.param("w4a8", m, marks=needs_avx2) for m in ("decode", "decode-groups")),
        pytest.param("w8a8-avx2", "decode-groups", marks=needs_avx2),
    ],
)  # fmt: skip
def test_compiled_decode_runs_w8a8_projections_with_the_eager_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quant: str, mode: str
) -> None:
    """With `decode-groups`, each of the two blocks a group of its own: both run one graph, so
    a layer's packed weights read as a constant of the graph would give the other's tokens."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(compiled_decode, "MAX_GROUP", 1)
    torch._dynamo.reset()
    counters.clear()
    try:
        model = tiny_model(methods=quant_table(quant))
        compiled = Engine(model, NoTokenizer(), 4, 48, compile=mode)  # type: ignore[arg-type]
        eager = Engine(tiny_model(methods=quant_table(quant)), NoTokenizer(), 4, 48)  # type: ignore[arg-type]
        assert run(compiled) == run(eager)
        assert counters["stats"]["unique_graphs"] == 2  # one row; two or more
    finally:
        torch._dynamo.reset()


@needs_vnni
@pytest.mark.parametrize("quant", ["w8a8", pytest.param("w8a8-avx512", marks=needs_avx512)])
def test_w8a8_cannot_share_a_graph_between_blocks(quant: str) -> None:
    """W8A8's packed matrices are reached by a handle (an int a graph takes as a constant)."""
    model = tiny_model(methods=quant_table(quant))
    with pytest.raises(ModelLoadError, match="holds its weights outside its tensors"):
        compiled_decode.compile_decode(model, grouped=True)
    assert model.decode_step is None


@pytest.mark.slow  # four compiles of the tiny model (~1-2 minutes on 2 cores)
@pytest.mark.parametrize("mode", ["decode", "decode-groups"])
def test_two_models_in_one_process_run_their_own_graphs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Dynamo keeps graphs on the code object and the modules go unguarded: without code of
    their own (`compiled_decode.own_code`), a second model compiled in the process (a bench's
    next kernel set) ran the first one's `decode` graphs, frozen weights and all (this failed
    before it). Grouped graphs take the weights as inputs; they get code of their own too, as
    two models' blocks need not be alike."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    torch._dynamo.reset()
    try:
        models = [tiny_model(seed=seed) for seed in (0, 1)]
        expected = [run(Engine(tiny_model(seed=s), NoTokenizer(), 4, 48)) for s in (0, 1)]  # type: ignore[arg-type]
        assert expected[0] != expected[1]
        engines = [Engine(m, NoTokenizer(), 4, 48, compile=mode) for m in models]  # type: ignore[arg-type]
        assert [run(e) for e in engines] == expected
    finally:
        torch._dynamo.reset()
