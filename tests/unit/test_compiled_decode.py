"""The compiled decode step (`compile: decode`): the eager engine's tokens, two graphs for every
batch, nothing of the weights on disk, and a clear refusal where a block crosses the TD.

One compile of the tiny model (~10-20 s on 2 cores) is shared by the module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from tdllm.engine import Engine, SamplingParams
from tdllm.errors import ModelLoadError
from tdllm.model import compiled_decode
from tdllm.model.cache_layout import DecodeWindow
from tdllm.model.compiled_decode import CACHE_DIR_ENV, compile_decode, group_size, why_not
from tdllm.model.linear import LinearMethodTable, PrepackedCpuMethod, can_prepack_bf16
from tdllm.model.transformer import Batch, KVCache, Transformer
from tests.protection.engine_runs import NoTokenizer
from tests.tiny_model import TINY, tiny_model, tiny_tensors

PROMPTS = [[5, 17, 3, 42, 8], [9, 1, 60, 2, 11, 12, 13, 14, 15], [33], [70, 71, 72]]
SHORT = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("inductor")
    before = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(path)
    torch._dynamo.reset()
    counters.clear()
    yield path
    torch._dynamo.reset()
    if before is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = before


@pytest.fixture(scope="module")
def compiled(cache_dir: Path) -> Engine:
    """Grouped (fp32 weights, plain kernels), one block a group: the tiny model's two blocks
    call the same graphs, as a real model's groups do."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiled_decode, "MAX_GROUP", 1)
        engine = Engine(tiny_model(), NoTokenizer(), 4, 48, compile="decode-groups")  # type: ignore[arg-type]
    step = engine.model.decode_step
    assert isinstance(step, compiled_decode.GroupedDecodeStep) and step.size == 1
    return engine


def eager() -> Engine:
    return Engine(tiny_model(), NoTokenizer(), 4, 48)  # type: ignore[arg-type]


def run(engine: Engine) -> list[list[int]]:
    """Four prompts with different lengths, one of a single token (its prefill is one token at
    position 0); two stop early, so later steps decode slots with a gap (slots 1 and 3) and a
    lone sequence in a slot other than 0."""
    params = [SHORT, LONG, SHORT, LONG]
    return [c.token_ids for c in engine.generate(PROMPTS, params)]


def test_compiled_decode_generates_the_eager_engines_tokens(compiled: Engine) -> None:
    assert run(compiled) == run(eager())
    lone = [[1, 2, 3]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    assert compiled.generate(*lone)[0].token_ids == eager().generate(*lone)[0].token_ids


def test_compiled_logits_match_eager_logits_for_every_row(compiled: Engine) -> None:
    model, cache = compiled.model, KVCache(compiled.model.cfg, 4, 48, torch.float32)
    reference = tiny_model()
    ref_cache = KVCache(reference.cfg, 4, 48, torch.float32)
    with torch.inference_mode():
        for slot, prompt in enumerate(PROMPTS):
            batch = Batch([slot], [0], len(prompt))
            model(torch.tensor([prompt]), batch, cache)
            reference(torch.tensor([prompt]), batch, ref_cache)
        slots = [1, 3]  # a gap: slots 0 and 2 idle
        step = Batch(slots, [len(PROMPTS[s]) for s in slots], 1)
        tokens = torch.tensor([[4], [6]])
        got = model(tokens, step, cache)
        want = reference(tokens, step, ref_cache)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the step wrote each row's keys at its own slot and position, as eager did
    for layer in range(model.cfg.num_layers):
        torch.testing.assert_close(cache.k[layer], ref_cache.k[layer], rtol=1e-4, atol=1e-4)


def test_two_graphs_serve_every_batch_size_slot_set_and_length(compiled: Engine) -> None:
    """Both traced at load (one row; two or more), none by the batches after, and shared by
    every group of blocks."""
    traced = counters["stats"]["unique_graphs"]
    run(compiled)
    compiled.generate([[1, 2, 3]], LONG)  # alone in slot 0: the one-row graph
    assert traced == counters["stats"]["unique_graphs"] == 2


def test_a_sequence_left_alone_in_a_later_slot_moves_to_slot_0_and_runs_the_one_row_graph(
    compiled: Engine,
) -> None:
    """Two sequences share steps until the one in slot 0 finishes; the other, alone in slot 1,
    would go through the two-row graph twice over (`DecodeWindow.covering`): it moves to slot
    0, its cache rows with it, and its tokens are still the eager engine's."""
    windows: list[tuple[list[int], int]] = []
    covering = DecodeWindow.covering

    def spy(batch: Batch) -> DecodeWindow:
        window = covering(batch)
        windows.append((list(window.slots), window.rows))
        return window

    prompts, params = [[5, 17, 3], [9, 1, 60, 2]], [SHORT, LONG]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DecodeWindow, "covering", staticmethod(spy))
        got = [c.token_ids for c in compiled.generate(prompts, params)]
    assert got == [c.token_ids for c in eager().generate(prompts, params)]
    assert ([0, 1], 2) in windows  # together first
    alone = windows[windows.index(([0, 1], 2)) + 2 :]  # the short one's last token was 3rd
    assert alone and all(w == ([0], 1) for w in alone), windows


def files_holding_weight_bytes(model: Transformer, folder: Path) -> list[Path]:
    """What an attacker reading the TD's disk would search for: 32-byte pieces sampled from
    every weight (eight per tensor), in every file under `folder`."""
    needles = []
    for param in model.parameters():
        data = param.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        needles += [data[i : i + 32] for i in range(0, len(data) - 32, max(32, len(data) // 8))]
    files = [f for f in folder.rglob("*") if f.is_file()]
    return [f for f in files if any(n in f.read_bytes() for n in needles)]


def test_compiling_writes_none_of_the_weights_to_disk(compiled: Engine, cache_dir: Path) -> None:
    assert any(f.is_file() for f in cache_dir.rglob("*")), "inductor wrote elsewhere: no proof"
    assert files_holding_weight_bytes(compiled.model, cache_dir) == []


def test_the_weight_scan_finds_weights_saved_as_torch_saves_them(tmp_path: Path) -> None:
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "leak.pt")  # the leak the scan above must catch
    assert files_holding_weight_bytes(model, tmp_path) == [tmp_path / "leak.pt"]


class CrossingMethod:
    """A stand-in for a method whose product leaves the TD (masked's, obfuscated's)."""

    def create_weights(self, layer, dtype):  # type: ignore[no-untyped-def]
        layer.weight = torch.nn.Parameter(
            torch.empty(layer.out_features, layer.in_features), requires_grad=False
        )

    def load_weight(self, layer, weight, row_offset=0):  # type: ignore[no-untyped-def]
        layer.weight.data[row_offset : row_offset + weight.shape[0]] = weight

    def after_load(self, layer):  # type: ignore[no-untyped-def]
        pass

    def apply(self, layer, x):  # type: ignore[no-untyped-def]
        return torch.nn.functional.linear(x, layer.weight)


def test_a_compiled_model_refuses_to_be_placed_again(compiled: Engine) -> None:
    """The graph skips guards on the modules (their weights are frozen into it): a profile's
    placement installed after compiling would be silently ignored, so it is refused."""
    model = compiled.model
    with pytest.raises(RuntimeError, match="place the model before compiling"):
        model.place(None, lambda _layer: lambda *args: args[0])
    assert model.prefix is None
    assert all(block.self_attn.core is None for block in model.layers)  # type: ignore[union-attr]


def test_refuses_to_compile_a_model_whose_block_crosses_the_td() -> None:
    table = LinearMethodTable([("*.down_proj", CrossingMethod())])  # type: ignore[list-item]
    model = tiny_model(methods=table)
    assert "down_proj runs on CrossingMethod" in (why_not(model) or "")
    with pytest.raises(ModelLoadError, match="compile 'decode' needs every block in the TD"):
        compile_decode(model)
    assert model.decode_step is None


def test_plain_model_has_no_reason_not_to_compile() -> None:
    model: Transformer = tiny_model()
    assert why_not(model) is None


@pytest.mark.parametrize(
    ("blocks", "size"), [(1, 1), (2, 2), (7, 7), (16, 8), (28, 7), (30, 6), (32, 8), (29, 8)]
)
def test_groups_are_even_where_the_block_count_allows(blocks: int, size: int) -> None:
    assert group_size(blocks) == size


def test_bf16_weights_reordered_for_onednn_cannot_share_a_graph_between_blocks() -> None:
    """oneDNN's packed bf16 weights are an opaque tensor outside the parameters: a graph shared
    by the blocks would take the first block's as a constant, so `decode-groups` refuses."""
    if not can_prepack_bf16():
        pytest.skip("no native bf16: nothing is reordered")
    table = LinearMethodTable(default=PrepackedCpuMethod(prepack=True))
    model = Transformer(TINY, table, torch.bfloat16)
    model.load_weights(tiny_tensors().items())
    model.after_load()
    assert "holds its weights outside its tensors" in (compiled_decode.why_not_grouped(model) or "")
    with pytest.raises(ModelLoadError, match="use compile 'decode'"):
        compile_decode(model, grouped=True)
    assert model.decode_step is None


def test_blocks_on_different_methods_cannot_share_a_graph() -> None:
    table = LinearMethodTable([("model.layers.1.*", PrepackedCpuMethod(prepack=False))])
    model = tiny_model(methods=table)
    assert compiled_decode.why_not_grouped(tiny_model()) is None
    assert "not all alike" in (compiled_decode.why_not_grouped(model) or "")


def test_the_frozen_tail_gives_the_eager_engines_tokens(cache_dir: Path) -> None:
    """`compile: decode`: the whole tail one graph, its weights constants. (Inductor fails to
    trace the tiny model in bf16 with weights packed for oneDNN, "name 's6' is not defined",
    torch 2.13: a load error of one line; the bundled model's bf16 tail compiles.)"""
    engine = Engine(tiny_model(), NoTokenizer(), 4, 48, compile="decode")  # type: ignore[arg-type]
    assert not isinstance(engine.model.decode_step, compiled_decode.GroupedDecodeStep)
    assert run(engine) == run(eager())
