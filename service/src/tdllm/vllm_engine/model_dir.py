"""The model directory vLLM reads at start: config and tokenizer, never a weight.

vLLM builds its model from a Hugging Face-style config.json and its tokenizer from
tokenizer.json/tokenizer_config.json in `--model`; the weights come separately, through the
tdllm load formats (tdllm_vllm.loader). For a sealed model these files are written from the
manifest whose MAC the service verified, into the private memory-backed run directory
(`child.run_directory`), so they are what was sealed, not what the host's disk says now.
"""

from __future__ import annotations

import json
from pathlib import Path

from tdllm.model.checkpoint import Checkpoint

CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def write_model_dir(checkpoint: Checkpoint, folder: Path) -> Path:
    """Write the files vLLM needs to build `checkpoint`'s model into `folder` (created)."""
    folder.mkdir(mode=0o700)
    tokenizer = checkpoint.tokenizer
    config = checkpoint.config.to_hf() | {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    # every token the tdllm engine stops on (SmolLM2: <|im_end|> and <|endoftext|>), and no
    # sampling defaults: a request's parameters (else OpenAI's defaults) decide, as on our engine
    stops = sorted(tokenizer.stop_token_ids)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}))
    tokenizer.save_hf_directory(folder)
    return folder
