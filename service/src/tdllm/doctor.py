"""`tdllm doctor`: what this machine offers the TD engine, and what is missing."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

from tdllm.model import avx2_kernel, avx512_kernel
from tdllm.model.cpu_features import HAS_VNNI, cpu_flags

TSM_REPORT = Path("/sys/kernel/config/tsm/report")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def onednn_version() -> str:
    found = re.search(r"(?:oneDNN|MKL-DNN) v([\w.]+)", torch.__config__.show())
    return found.group(1) if found else "not built in"


def ipex_status() -> str:
    try:
        import intel_extension_for_pytorch as ipex  # type: ignore[import-not-found]
    except ImportError:
        return "not installed (optional; retired upstream after 2.8 - stock PyTorch/oneDNN is used)"
    except Exception as exc:  # a version mismatch makes IPEX raise at import
        return f"installed but unusable with torch {torch.__version__}: {exc}"
    ipex_version = str(getattr(ipex, "__version__", "?"))
    if (
        ipex_version.split("+")[0].rsplit(".", 1)[0]
        != torch.__version__.split("+")[0].rsplit(".", 1)[0]
    ):
        return f"installed ({ipex_version}) but does not match torch {torch.__version__}: not used"
    return f"active ({ipex_version})"


def protection_status() -> str:
    from tdllm.profiles.registry import describe

    return describe()


def configured_protection() -> str:
    """The profile `tdllm serve` would use with the current settings (file + TDLLM_* env)."""
    from tdllm.settings import SettingsError, load_settings

    try:
        s = load_settings()
    except SettingsError as exc:
        return str(exc)
    if s.profile == "td-only":
        return "td-only (every block on the TD CPU)"
    reference = s.public_ref or "the pinned bundled base"
    return f"{s.profile} on device {s.device}, K={s.k}, public prefix checked against {reference}"


def quant_support() -> str:
    """Which ``quant`` settings load on this CPU, and why the others are refused."""
    runs = ["int8", "int4" if HAS_VNNI else "int4 (its head int8 weight-only: no VNNI)"]
    refused = []
    if HAS_VNNI:
        runs += ["w8a8", "w8a8-onednn"]
    else:
        refused.append("w8a8, w8a8-onednn (no VNNI)")
    if avx512_kernel.why_unavailable() is None:
        runs += ["w8a8-avx512", "w4a8-avx512"]
    else:
        refused.append("w8a8-avx512, w4a8-avx512 (avx512 kernels)")
    if avx2_kernel.why_unavailable() is None:
        runs += ["w8a8-avx2", "w4a8"]
    else:
        refused.append("w8a8-avx2, w4a8 (avx2 kernels)")
    return ", ".join(runs) + (f"; refused here: {'; '.join(refused)}" if refused else "")


def report() -> list[tuple[str, str]]:
    flags = cpu_flags()
    seen = [f for f in CPU_FLAGS if f in flags]
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    threads = f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"
    return [
        ("cpu", platform.processor() or platform.machine()),
        ("cpu features", ", ".join(seen) or "none of interest"),
        (
            "bf16 matmul",
            "native (AVX512-BF16/AMX)"
            if native_bf16
            # measured on an AVX2 EPYC (docs/performance.md, "Served on a CPU without AVX-512")
            else "emulated: prompts widened to fp32 (fp32's speed); decode reads bf16's half "
            "of the bytes (faster for one stream, fp32 from ~8 streams)",
        ),
        ("amx", "yes" if "amx_tile" in flags else "no"),
        ("torch", f"{torch.__version__} ({threads})"),
        ("oneDNN", onednn_version()),
        ("avx512 kernels", avx512_kernel.why_unavailable() or avx512_kernel.describe()),
        ("avx2 kernels", avx2_kernel.why_unavailable() or avx2_kernel.describe()),
        ("quants", quant_support()),
        ("ipex", ipex_status()),
        ("protection", protection_status()),
        ("served profile", configured_protection()),
        (
            "tdx guest",
            f"yes ({TSM_REPORT})" if TSM_REPORT.is_dir() else f"no ({TSM_REPORT} absent)",
        ),
    ]
