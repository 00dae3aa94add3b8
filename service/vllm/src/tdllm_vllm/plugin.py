"""The `vllm.general_plugins` entry point: registers tdllm's load formats with vLLM."""

from __future__ import annotations

SEALED_FORMAT = "tdllm-sealed"  # a sealed directory; the data key over an inherited descriptor
PLAIN_FORMAT = "tdllm"  # any plaintext source `tdllm` opens (the bundled GGUF, a HF directory)


def register() -> None:
    """Called by vLLM in each of its processes; importing vLLM here is safe (it is running)."""
    from vllm.model_executor.model_loader import register_model_loader

    from tdllm_vllm.loader import PlainLoader, SealedLoader

    register_model_loader(SEALED_FORMAT)(SealedLoader)
    register_model_loader(PLAIN_FORMAT)(PlainLoader)
