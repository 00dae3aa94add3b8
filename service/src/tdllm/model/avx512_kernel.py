"""Our W8A8 kernel for AVX-512 VNNI CPUs (``kernels/w8a8_avx512.cpp``), built at first use.

``quant: w8a8-avx512`` runs W8A8's product on it (`tdllm.model.w8a8_packed`, backend
``avx512``): at one row it streams the int8 weights 1.1-2x faster than FBGEMM (24-26 GB/s on
the 1B shapes), from 16 rows it runs AMX tiles where the CPU has them (docs/performance.md,
"Our own W8A8 kernel"). It is C++ compiled by torch's extension builder
on first use, so it needs what the compiled decode step needs: a C++ compiler and ninja on
``PATH`` (in the image: ``ml_runtime_cxx_compiler``). It is built from the source shipped in
the package (in the image: the measured root) into a directory only this user can write, and
loaded from there: a library another user could replace would run inside the TD, so a
directory with other owners or writers is refused, not used.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import torch

from tdllm.errors import ModelLoadError
from tdllm.model.cpu_features import HAS_AMX, cpu_flags

SOURCE = Path(__file__).with_name("kernels") / "w8a8_avx512.cpp"
NAME = "tdllm_w8a8_avx512"
# what the kernel's instructions need (VPDPBUSD on 512-bit registers, byte masks)
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-fopenmp"]
DIRECTORY_ENV = "TDLLM_KERNEL_DIR"
# rows from which the product runs on AMX tiles where the CPU has them (0: never); below it the
# VNNI stream, which reads the weights once for every six rows
AMX_MIN_ROWS = 16 if HAS_AMX and "amx_int8" in cpu_flags() else 0

log = logging.getLogger(__name__)


def missing_cpu_flags(flags: set[str] | None = None) -> list[str]:
    """The `CPU_FLAGS` this CPU lacks (`flags`: its flags; read from /proc/cpuinfo when None)."""
    have = cpu_flags() if flags is None else flags
    return [flag for flag in CPU_FLAGS if flag not in have]


def why_unavailable() -> str | None:
    """Why the kernel cannot run here, in one line (None: it can be built and run)."""
    missing = missing_cpu_flags()
    if missing:
        return (
            f"quant w8a8-avx512 needs AVX-512 VNNI; this CPU lacks {', '.join(missing)}: use w8a8"
        )
    compiler = os.environ.get("CXX", "c++")  # what torch's builder runs
    absent = [tool for tool in (compiler, "ninja") if shutil.which(tool) is None]
    if absent:
        return (
            "quant w8a8-avx512 builds its kernel at first use and needs a C++ compiler and "
            f"ninja (image: ml_runtime_cxx_compiler); not found: {', '.join(absent)}"
        )
    return None


def describe() -> str:
    rows = f"AMX from {AMX_MIN_ROWS} rows" if AMX_MIN_ROWS else "no AMX"
    return f"can be built (AVX-512 VNNI, {rows}; built at first use)"


def build_directory(environ: dict[str, str] | None = None) -> Path:
    """Where the kernel is built and loaded from: ``TDLLM_KERNEL_DIR``, else a directory of
    this user's under the temporary directory (a tmpfs in the image). Created 0700; refused
    when another user owns it or anyone else may write to it."""
    env = os.environ if environ is None else environ
    path = Path(
        env.get(DIRECTORY_ENV) or Path(tempfile.gettempdir()) / f"tdllm-kernels-{os.getuid()}"
    )
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ModelLoadError(f"kernel directory {path} is not a directory")
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ModelLoadError(
            f"kernel directory {path} is not this user's alone (owner uid {info.st_uid}, mode "
            f"{stat.S_IMODE(info.st_mode):o}): a library built there could be replaced; "
            f"set {DIRECTORY_ENV} to a directory only this user can write"
        )
    return path


@functools.cache
def load() -> None:
    """Build (once per source and torch version; ninja skips an up-to-date build) and load
    the kernel, registering ``torch.ops.tdllm_avx512``. Raises `ModelLoadError`, one line, when
    it cannot run here (`why_unavailable`) or the build fails."""
    reason = why_unavailable()
    if reason:
        raise ModelLoadError(reason)
    directory = build_directory()
    from torch.utils import cpp_extension  # imports setuptools: only when the kernel is used

    started = time.monotonic()
    log.info("building the w8a8-avx512 kernel in %s (the first time: ~10-20 s)", directory)
    try:
        cpp_extension.load(
            NAME, [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
            build_directory=str(directory), is_python_module=False, verbose=False,
        )  # fmt: skip
    except (OSError, RuntimeError) as error:  # no compiler or ninja, or it failed
        lines = str(error).strip().splitlines() or [type(error).__name__]
        raise ModelLoadError(
            f"quant w8a8-avx512: building its kernel in {directory} failed: {lines[0][:160]}"
        ) from error
    log.info("w8a8-avx512 kernel ready in %.1f s", time.monotonic() - started)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K] int8`` in the kernel's layout (`load` first)."""
    return torch.ops.tdllm_avx512.pack(weight)


def row_sums(weight: torch.Tensor, outputs: int) -> torch.Tensor:
    """Each row's sum (int32), zeros after them up to `outputs`."""
    return torch.ops.tdllm_avx512.row_sums(weight, outputs)


def unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return torch.ops.tdllm_avx512.unpack(packed, n, k)


def product(
    scaled: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    sums: torch.Tensor,
    n: int,
    k: int,
    x_step: float,
    amx_min_rows: int = AMX_MIN_ROWS,
) -> torch.Tensor:
    """``scaled [M, >= K]`` (fp32 rows in [-1, 1]) times the `packed` weights, fp32 ``[M, N]``;
    `scales` and `sums` padded to the packed outputs (`pack`)."""
    return torch.ops.tdllm_avx512.w8a8(scaled, packed, scales, sums, n, k, x_step, amx_min_rows)
