"""Hugging Face transformers' LlamaForCausalLM loaded from the same GGUF: the reference."""

from __future__ import annotations

from typing import Any

import torch


def load_hf(checkpoint: Any, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = checkpoint.path
    return LlamaForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype
    ).eval()


def hf_greedy(model: Any, prompt: list[int], new_tokens: int, eos: int) -> list[int]:
    """Greedy tokens up to and including the first `eos` (transformers stops there too)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    tokens = [int(t) for t in out[0, len(prompt) :]]
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
