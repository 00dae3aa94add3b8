"""Waiting for the requests in flight to finish: what a drain asks of either engine's front
(`tdllm.api.runner.EngineRunner`, `tdllm.vllm_engine.backend.VllmBackend`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

POLL_S = 0.25


def wait_for_idle(
    idle: threading.Condition,
    outstanding: Callable[[], int],
    alive: Callable[[], bool],
    timeout_s: float,
) -> bool:
    """Wait until `outstanding()` is 0 or the engine is no longer `alive()`; False if
    `timeout_s` passed first. `idle` is notified when the count reaches 0; it is waited on a
    slice at a time, because an engine that dies notifies no one."""
    deadline = time.monotonic() + timeout_s
    with idle:
        while outstanding() > 0 and alive():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            idle.wait(min(remaining, POLL_S))
    return True
