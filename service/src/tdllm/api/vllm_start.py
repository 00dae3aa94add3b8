"""Starting the `vllm` engine from the service's settings (docs/vllm.md): what `Boot` runs for
engine = "vllm", and how the serve bench starts vLLM alone the same way."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tdllm.settings import GPU_CC, Settings, logprobs_limit
from tdllm.vllm_engine.args import option_value
from tdllm.vllm_engine.backend import VllmBackend
from tdllm.vllm_engine.child import SealedHandoff, VllmLaunch, VllmProcess, kv_cache_gib


def vllm_launch(settings: Settings, checkpoint: Any, tcp_port: int | None = None) -> VllmLaunch:
    """How the service starts vLLM for `checkpoint` under `settings` (the serve bench's
    vllm-alone too, with `tcp_port`)."""
    from tdllm.model.bundled import BUNDLED_NAME, bundled_model_path

    s = settings
    name = s.served_model_name or (BUNDLED_NAME if s.model == "bundled" else checkpoint.name)
    context = min(s.context_tokens, checkpoint.config.max_position_embeddings)
    max_len = int(option_value(s.vllm_args, "--max-model-len") or context)
    # a path vLLM's venv can open without the bundled model's package installed in it
    source = str(bundled_model_path() if s.model == "bundled" else Path(s.model).resolve())
    sequences = int(option_value(s.vllm_args, "--max-num-seqs") or s.max_batch)
    return VllmLaunch(
        # absolute, symlinks kept: Popen looks a relative path up in the child's cwd, and a
        # venv's python is a symlink that must stay one (resolved, it leaves the venv)
        python=Path(os.path.abspath(s.vllm_python or "")),
        source=source,
        served_name=name,
        dtype=s.dtype,
        max_model_len=max_len,
        max_num_seqs=s.max_batch,
        extra_args=s.vllm_args,
        # the tdllm engine's KV budget for the same settings (vLLM allocates all of it): no
        # more than its sequences can fill
        kv_cache_gib=kv_cache_gib(
            checkpoint, s.dtype, min(s.kv_cache_tokens or 1 << 62, sequences * max_len)
        ),
        max_logprobs=logprobs_limit(s.logprobs_policy) or 0,
        tcp_port=tcp_port,
    )


def start_vllm(
    settings: Settings,
    checkpoint: Any,
    handoff: SealedHandoff | None,
    waiting: Callable[[float], None],
    on_exit: Callable[[str], None],
) -> VllmBackend:
    """Start vLLM on `checkpoint` (`handoff`: a sealed model's key, wiped here) and wait until
    it answers; raises `VllmStartFailed` with the not-ready reason."""
    launch = vllm_launch(settings, checkpoint)
    process = VllmProcess(launch)
    process.start(checkpoint, handoff)
    process.wait_ready(settings.vllm_start_timeout_s, waiting)
    return VllmBackend(
        process,
        model_name=launch.served_name,
        max_model_len=launch.max_model_len,
        vocab_size=max(checkpoint.config.vocab_size, checkpoint.tokenizer.vocab_size),
        capacity=settings.max_batch + settings.queue_size,
        protection=_protection(settings),
        on_exit=on_exit,
    ).start_watching()


def _protection(settings: Settings) -> dict[str, Any]:
    """What /v1/models says of where the model runs: all in the TD, or (gpu-cc) on the
    attested confidential-computing GPU, which is inside the trust boundary."""
    on_gpu = settings.profile == GPU_CC and settings.gpu_evidence == "nvml"
    return {"profile": settings.profile, "device": "cuda" if on_gpu else None, "k": None}
