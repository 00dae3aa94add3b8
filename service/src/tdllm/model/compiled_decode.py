"""The decode step as compiled graphs (`compile: decode` or `decode-groups`; issue 15, item 1).

Eager, a decode step of the bundled model runs ~5 000 aten ops (norms, RoPE, SwiGLU, cache
writes, views) and the Python around them: a third of the step on top of the matmuls
(docs/performance.md, "Where a decode step goes"). Here the blocks that run in this process are
compiled by TorchInductor for decode steps, elementwise work fused into a few C++ loops, in one
of two ways:

- **`decode`**: `Transformer.tail` (the blocks, the final norm and the head) as one graph with
  the weights frozen into it (inductor's `freezing`: bf16 linears packed for oneDNN with their
  pointwise neighbours fused in). The fastest step; its compile traces every block: 3-7 minutes
  for the bundled model on 2 cores.
- **`decode-groups`**: one graph runs a group of up to `MAX_GROUP` consecutive blocks, their
  weights its inputs, and every group of the model calls that same graph
  (`GroupedDecodeStep`); the final norm and the head run eagerly around it. Its compile traces
  one group: ~1 minute for the bundled model's two graphs where `decode` took 4-7, for steps
  1.0-1.2x as long as `decode`'s (docs/performance.md, "Compiled a group of blocks at a
  time"). Only where each projection's state is its tensors and the blocks are alike
  (`why_not_grouped`): a shared graph would run the first group's state where it is held
  elsewhere (`OUTSIDE_TENSORS`).

Prefill stays eager: its matmuls dwarf the rest.

Two graphs serve every batch: the step is traced with symbolic sizes (`dynamic=True`) over a
`DecodeWindow`, whose only Python state is two ints, so batch size, slots and lengths do not
retrace. Dynamo specializes a size of 1, so a lone sequence in slot 0 (one user) runs a graph of
its own, which reads each weight once (the int kernels' GEMVs cost nearly twice at two rows), and
every other batch is at least two rows and two sequences wide (`DecodeWindow.covering`) and runs
the other; the engine moves a sequence left alone in a later slot to slot 0. `warm_up` traces
both at load, where the service pays for them, not a request.

Where it runs: every block this process runs uses stock TD CPU kernels (`TdCpuKernels`: plain,
prepacked, int8, int4, W8A8) and no attention core, i.e. td-only, and split's private tail (the
prefix's crossing stays outside the graph). masked and obfuscated cross inside each block: they
stay eager (`why_not`).

What it writes: inductor's generated C++/Python and the shared objects built from them, into a
private directory of this process (mode 0700, removed at exit); never the weights (grouped
graphs take them as inputs; frozen weights stay in memory; the FX graph cache, which could
serialize constants, is off): tests/unit/test_compiled_decode.py scans that directory for the
model's weight bytes.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
import types
import warnings
from collections.abc import Callable

import torch
from torch import nn

from tdllm.errors import ModelLoadError
from tdllm.model.cache_layout import Batch, KVCache
from tdllm.model.linear import Linear, TdCpuKernels
from tdllm.model.transformer import Attention, Transformer

CACHE_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"


def blocks_here(model: Transformer) -> nn.ModuleList:
    """The blocks this process runs: all but a profile's prefix (`PrefixPlacement`)."""
    return model.layers[model.prefix.num_layers if model.prefix is not None else 0 :]


def why_not(model: Transformer) -> str | None:
    """Why the decode step of `model` cannot be compiled (None: it can)."""
    here = [*blocks_here(model), model.lm_head]
    linears = [m for part in here for m in part.modules() if isinstance(m, Linear)]
    crossing = [m for m in linears if not isinstance(m.method, TdCpuKernels) or m.method.leaves_td]
    if crossing:
        return f"{crossing[0].name} runs on {type(crossing[0].method).__name__}"
    cores = [a for part in here for a in part.modules() if isinstance(a, Attention)]
    if any(a.core is not None for a in cores):
        return "an attention core runs outside the TD"
    return None


MAX_GROUP = 8  # blocks a grouped graph runs: larger compiles longer, smaller calls more often


def compile_decode(model: Transformer, grouped: bool = False) -> None:
    """Install the compiled decode step on `model` (traced on its first calls: `warm_up`):
    the whole tail frozen (`compile: decode`), or a group of blocks at a time (`grouped`,
    `compile: decode-groups`)."""
    mode = "decode-groups" if grouped else "decode"
    reason = why_not(model)
    if reason is not None:
        raise ModelLoadError(
            f"compile {mode!r} needs every block in the TD on TD CPU kernels ({reason}); "
            "use it with td-only or split, or compile 'off'"
        )
    reason = why_not_grouped(model) if grouped else None
    if reason is not None:
        raise ModelLoadError(
            f"compile 'decode-groups' shares one graph between the blocks, but {reason}; "
            "use compile 'decode', or quant int8, int4, w8a8-avx2, w4a8 or w4a8-avx512"
        )
    private_cache_dir()
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as fx_config

    frozen = not grouped
    # set process-wide, not per call: dynamo reads `freezing` while it traces (to keep the
    # parameters out of the graph's inputs), before a call's own options apply
    inductor_config.freezing = frozen
    # sizes equal when traced (say batch 2, 2 rows) must not be assumed equal for ever
    fx_config.use_duck_shape = False
    inductor_config.fx_graph_cache = False  # it may serialize frozen constants: the weights
    functorch_config.enable_autograd_cache = False
    # no guards on the modules' attributes (0.7 of the bundled model's 1.0 ms of guard checks
    # a step, and what lets every group share one graph): the model refuses to be placed again
    # once compiled (`Transformer.place`); inputs stay guarded
    options: dict[str, str | int | bool | Callable[..., object]] = {
        "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe
    }
    # each model's graphs on code of its own (`own_code`): dynamo keeps them on the code object,
    # and with the modules unguarded a second model in this process (a bench's) would run the
    # first one's
    if frozen:
        tail = type("_Tail", (_Tail,), {"forward": own_code(_Tail.forward)})
        model.decode_step = torch.compile(
            tail(model), dynamic=True, fullgraph=True, options=options
        )
    else:
        step = torch.compile(own_code(run_blocks), dynamic=True, fullgraph=True, options=options)
        model.decode_step = GroupedDecodeStep(model, step)


def own_code(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`function` with a copy of its code object (the same code, another object)."""
    assert isinstance(function, types.FunctionType)
    return types.FunctionType(
        function.__code__.replace(), function.__globals__, function.__name__,
        function.__defaults__, function.__closure__,
    )  # fmt: skip


# a projection's state outside its parameters and buffers, which a graph takes as a constant,
# not an input: oneDNN's reordered bf16 weights (`PrepackedCpuMethod`: an opaque tensor inductor
# lowers only when frozen) and W8A8's handle to its packed matrices (an int, every backend).
# A graph shared by every group would run the first group's.
OUTSIDE_TENSORS = ("packed_weight", "w8a8_handle")


def why_not_grouped(model: Transformer) -> str | None:
    """Why one graph cannot run every group of `model`'s blocks (None: it can): a projection
    holds state outside its tensors (`OUTSIDE_TENSORS`), or the blocks are not all alike."""
    blocks = blocks_here(model)  # (the head runs eagerly: any method will do)
    for m in blocks.modules():
        held = [key for key in OUTSIDE_TENSORS if key in vars(m)]
        if isinstance(m, Linear) and held:
            return f"{m.name} holds its weights outside its tensors ({type(m.method).__name__})"
    if len({block_signature(b) for b in blocks}) > 1:
        return "the blocks are not all alike (their methods or tensors differ)"
    return None


def block_signature(block: nn.Module) -> tuple[object, ...]:
    """What a graph traced on one block assumes of another: each module's type and, for a
    projection, its method's type and settings; each tensor's name, shape and dtype."""
    parts: list[object] = []
    for name, module in block.named_modules():
        parts.append((name, type(module)))
        if isinstance(module, Linear):
            method = module.method
            settings = sorted(
                (k, v) for k, v in vars(method).items() if isinstance(v, int | float | str | bool)
            )
            parts.append((type(method), tuple(settings)))
    for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
        parts.append((name, tuple(tensor.shape), tensor.dtype))
    return tuple(parts)


def group_size(blocks: int) -> int:
    """Blocks a grouped graph runs: the largest divisor of `blocks` up to `MAX_GROUP` (every
    group the same graph), or `MAX_GROUP` where that is below half of it (a prime count: the
    last, shorter group traces a graph of its own)."""
    size = max(d for d in range(1, min(blocks, MAX_GROUP) + 1) if blocks % d == 0)
    return size if 2 * size >= min(blocks, MAX_GROUP) else MAX_GROUP


def run_blocks(
    blocks: list[nn.Module],
    x: torch.Tensor,
    batch: Batch,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
) -> torch.Tensor:
    """Hidden states after `blocks` in turn: the function a grouped graph is traced from."""
    for block, k_cache, v_cache in zip(blocks, k_caches, v_caches, strict=True):
        x = block(x, batch, cos, signed_sin, k_cache, v_cache)
    return x


class GroupedDecodeStep:
    """`Transformer.tail` for a decode step, its blocks run a group at a time by one compiled
    graph (`run_blocks`); the rope rows, the final norm and the head run eagerly."""

    def __init__(self, model: Transformer, compiled: Callable[..., torch.Tensor]) -> None:
        self.model, self.compiled = model, compiled
        self.size = group_size(len(blocks_here(model)))

    def __call__(self, x: torch.Tensor, batch: Batch, cache: KVCache, start: int) -> torch.Tensor:
        model, end, size = self.model, len(self.model.layers), self.size
        cos = model.rope_cos[batch.positions][:, :, None]
        signed = model.rope_signed_sin[batch.positions][:, :, None]
        offset = start if len(cache.k) == end - start else 0  # as `Transformer.forward_blocks`
        for first in range(start, end, size):
            last = min(end, first + size)
            x = self.compiled(
                list(model.layers[first:last]), x, batch, cos, signed,
                cache.k[first - offset : last - offset], cache.v[first - offset : last - offset],
            )  # fmt: skip
        return model.lm_head(model.norm(batch.last(x)))


class _Tail(torch.nn.Module):
    """`Transformer.tail` as the forward of a module that holds the model: inductor freezes
    the parameters of the module it compiles (a bound method's would be graph inputs)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, batch: Batch, cache: KVCache, start: int) -> torch.Tensor:
        return self.model.tail(x, batch, cache, start)


def private_cache_dir() -> str:
    """Inductor's cache directory: one of this process's own, removed at exit (a directory
    set by the operator through TORCHINDUCTOR_CACHE_DIR is kept)."""
    given = os.environ.get(CACHE_DIR_ENV)
    if given:
        return given
    path = tempfile.mkdtemp(prefix="tdllm-inductor-")  # mode 0700
    os.environ[CACHE_DIR_ENV] = path
    atexit.register(shutil.rmtree, path, True)
    return path


def warm_up_batches(max_batch: int, max_seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Slots and positions of the decode steps that trace the graphs a served batch needs
    (`DecodeWindow.covering`): one sequence in slot 0, and, where the cache has two slots, a
    batch of two with its sizes kept apart (rows 3, batch 2, span 5) where the cache allows."""
    position = min(4, max_seq_len - 1)
    batches = [[0]]
    if max_batch >= 2:
        batches.append([0, 2] if max_batch >= 3 else [0, 1])
    return [(slots, [position] * len(slots)) for slots in batches]


@torch.inference_mode()
def warm_up(
    model: Transformer,
    cache: KVCache,
    max_batch: int,
    max_seq_len: int,
    status: Callable[[str], None] = lambda _: None,
) -> float:
    """Trace and compile every decode graph now; seconds it took. It writes keys and values of
    token 0 into free slots, which no sequence reads before overwriting them (as a finished
    request's)."""
    if model.decode_step is None:
        return 0.0
    started = time.perf_counter()
    batches = warm_up_batches(max_batch, max_seq_len)
    for i, (slots, starts) in enumerate(batches, 1):
        status(f"compiling the decode step ({i}/{len(batches)}) ...")
        tokens = torch.zeros(len(slots), 1, dtype=torch.long)
        try:
            with warnings.catch_warnings():  # torch's own deprecations, inside inductor
                warnings.simplefilter("ignore", DeprecationWarning)
                model(tokens, Batch(slots, starts, 1), cache)
        except Exception as exc:  # inductor's errors are long and many-typed
            model.decode_step = None
            lines = [line for line in str(exc).splitlines() if line.strip()]
            said = [line for line in lines if not line.endswith("raised:")] or [repr(exc)]
            first = said[0].strip()[:300]
            raise ModelLoadError(
                f"compiling the decode step failed: {first} (inductor needs a C++ compiler, "
                "g++; compile 'off' runs the step eagerly)"
            ) from exc
    return time.perf_counter() - started
