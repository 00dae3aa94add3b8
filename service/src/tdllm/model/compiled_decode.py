"""The decode step as one compiled graph (`compile: decode`; issue 15, item 1).

Eager, a decode step of the bundled model runs ~6 000 aten ops (norms, RoPE, SwiGLU, cache
writes, views) and the Python around them: a third of the step on top of the matmuls
(docs/performance.md, "Where a decode step goes"). Here `Transformer.tail` (the blocks that run
in this process, the final norm and the head) is compiled by TorchInductor for decode steps:
elementwise work fused into a few C++ loops, the weights frozen into the graph (inductor's
`freezing`: bf16 linears packed for oneDNN, pointwise ops fused into them) and one Python call
per step. Prefill stays eager: its matmuls dwarf the rest.

Two graphs serve every batch: the step is traced with symbolic sizes (`dynamic=True`) over a
`DecodeWindow`, whose only Python state is two ints, so batch size, slots and lengths do not
retrace. Dynamo specializes a size of 1, so a lone sequence in slot 0 (one user) runs a graph of
its own, which reads each weight once (the int kernels' GEMVs cost nearly twice at two rows), and
every other batch is at least two rows and two sequences wide (`DecodeWindow.covering`) and runs
the other; the engine moves a sequence left alone in a later slot to slot 0. `warm_up` traces
both at load, where the service pays for them, not a request.

Where it runs: every block this process runs uses stock TD CPU kernels (`TdCpuKernels`: plain,
prepacked, int8, int4) and no attention core, i.e. td-only, and split's private tail (the
prefix's crossing stays outside the graph). masked and obfuscated cross inside each block: they
stay eager (`why_not`).

What it writes: inductor's generated C++/Python and the shared objects built from them, into a
private directory of this process (mode 0700, removed at exit); never the weights (frozen
weights stay in memory; the FX graph cache, which could serialize constants, is off):
tests/unit/test_compiled_decode.py scans that directory for the model's weight bytes.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

from tdllm.errors import ModelLoadError
from tdllm.model.cache_layout import Batch, KVCache
from tdllm.model.linear import Linear, TdCpuKernels
from tdllm.model.transformer import Attention, Transformer

CACHE_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"


def why_not(model: Transformer) -> str | None:
    """Why the decode step of `model` cannot be compiled (None: it can)."""
    start = model.prefix.num_layers if model.prefix is not None else 0
    here = [*model.layers[start:], model.lm_head]
    linears = [m for part in here for m in part.modules() if isinstance(m, Linear)]
    crossing = [m for m in linears if not isinstance(m.method, TdCpuKernels) or m.method.leaves_td]
    if crossing:
        return f"{crossing[0].name} runs on {type(crossing[0].method).__name__}"
    cores = [a for part in here for a in part.modules() if isinstance(a, Attention)]
    if any(a.core is not None for a in cores):
        return "an attention core runs outside the TD"
    return None


def compile_decode(model: Transformer) -> None:
    """Install the compiled decode step on `model` (traced on its first calls: `warm_up`)."""
    reason = why_not(model)
    if reason is not None:
        raise ModelLoadError(
            f"compile 'decode' needs every block in the TD on TD CPU kernels ({reason}); "
            "use it with td-only or split, or compile 'off'"
        )
    private_cache_dir()
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as fx_config

    # set process-wide, not per call: dynamo reads `freezing` while it traces (to keep the
    # parameters out of the graph's inputs), before a call's own options apply
    inductor_config.freezing = True
    # sizes equal when traced (say batch 2, 2 rows) must not be assumed equal for ever
    fx_config.use_duck_shape = False
    inductor_config.fx_graph_cache = False  # it may serialize frozen constants: the weights
    functorch_config.enable_autograd_cache = False
    # no guards on the modules' attributes (0.7 of the bundled model's 1.0 ms of guard checks
    # a step): the graph's weights are frozen constants anyway, and the model refuses to be
    # placed again once compiled (`Transformer.place`); inputs stay guarded
    model.decode_step = torch.compile(
        _Tail(model),
        dynamic=True,
        fullgraph=True,
        options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
    )


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
