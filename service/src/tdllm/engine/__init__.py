"""Prefill + decode over a slot-based KV cache, sampling and stop handling.

The engine deals in token ids and text deltas; it knows nothing of HTTP. `Engine.step()` admits
waiting requests (prefill) and advances every running one by a token in one batched decode, so
requests of different lengths join and leave between steps (continuous batching).
"""

from tdllm.engine.engine import Engine
from tdllm.engine.outputs import Completion, StepOutput
from tdllm.engine.sampling import SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "StepOutput"]
