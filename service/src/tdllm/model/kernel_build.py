"""Building our C++ kernels (``kernels/*.cpp``) at first use, with torch's extension builder,
and the checks before it: `tdllm.model.avx512_kernel` (AVX-512 VNNI) and
`tdllm.model.avx2_kernel` (AVX2) each build one library through here.

The library runs inside the TD, so it is built from the sources shipped in the package (in the
image: the measured root) into a directory only this user can write, and loaded from there: a
library another user could replace would run inside the TD, so a directory with other owners or
writers is refused, not used. Building needs what the compiled decode step needs: a C++
compiler and ninja on ``PATH`` (in the image: ``ml_runtime_cxx_compiler``).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tdllm.errors import ModelLoadError

KERNELS = Path(__file__).with_name("kernels")
DIRECTORY_ENV = "TDLLM_KERNEL_DIR"

log = logging.getLogger(__name__)


def missing_tools(quant: str) -> str | None:
    """Why `quant`'s kernel cannot be built here (no compiler or ninja), in one line; or None."""
    compiler = os.environ.get("CXX", "c++")  # what torch's builder runs
    absent = [tool for tool in (compiler, "ninja") if shutil.which(tool) is None]
    if absent:
        return (
            f"quant {quant} builds its kernel at first use and needs a C++ compiler and "
            f"ninja (image: ml_runtime_cxx_compiler); not found: {', '.join(absent)}"
        )
    return None


def build_directory(environ: dict[str, str] | None = None) -> Path:
    """Where the kernels are built and loaded from: ``TDLLM_KERNEL_DIR``, else a directory of
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


def build(name: str, sources: Sequence[str], flags: Sequence[str], what: str) -> None:
    """Build library `name` (once per source and torch version; ninja skips an up-to-date build)
    in `build_directory` and load it, registering ``torch.ops.<name>``; a failure is one
    `ModelLoadError` line. Each library is its own subdirectory: two libraries' ninja files
    never overwrite each other."""
    directory = build_directory() / name
    directory.mkdir(mode=0o700, exist_ok=True)
    from torch.utils import cpp_extension  # imports setuptools: only when a kernel is used

    started = time.monotonic()
    log.info("building the %s in %s (the first time: ~20-40 s)", what, directory)
    try:
        cpp_extension.load(
            name, [str(KERNELS / f"{source}.cpp") for source in sources],
            extra_cflags=["-O3", *flags, "-fopenmp"], extra_ldflags=["-fopenmp"],
            build_directory=str(directory), is_python_module=False, verbose=False,
        )  # fmt: skip
    except (OSError, RuntimeError) as error:  # no compiler or ninja, or it failed
        lines = str(error).strip().splitlines() or [type(error).__name__]
        raise ModelLoadError(
            f"building the {what} in {directory} failed: {lines[0][:160]}"
        ) from error
    log.info("%s ready in %.1f s", what, time.monotonic() - started)
