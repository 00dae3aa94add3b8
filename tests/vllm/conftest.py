"""The vllm engine against a real vLLM: `make test-vllm` (skipped without the vLLM venv).

Services here run vLLM with --enforce-eager and a small KV cache: they start in about a minute
on a 2-core machine instead of three (compilation), and test behaviour, not speed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from tdllm.api.app import create_app
from tdllm.api.boot import BootDeps
from tdllm.settings import Settings
from tdllm_lab.local_service import free_port

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 600.0
# tools need a parser (hermes: <tool_call> JSON, for models without a tool-call format of
# their own) and auto tool choice switched on, even for a named or required tool
TEST_ARGS = ("--enforce-eager", "--enable-auto-tool-choice", "--tool-call-parser=hermes")


def vllm_python() -> Path:
    """The vLLM venv's python, or a skip saying how to get one."""
    configured = os.environ.get("TDLLM_TEST_VLLM_PYTHON")
    path = Path(configured) if configured else REPO / ".venv-vllm" / "bin" / "python"
    if not path.is_file():
        pytest.skip(
            f"no vLLM environment at {path}: `make vllm` makes it, `make test-vllm` runs these"
        )
    return path


@dataclass
class RunningService:
    app: Flask
    service: Any  # tdllm.api.app.Service
    url: str
    server: BaseWSGIServer
    restarts: list[str]

    @property
    def backend(self) -> Any:
        return self.service.state.runner

    def stop(self) -> None:
        runner = self.service.state.runner
        if runner is not None:
            runner.stop(5.0)
        self.server.shutdown()


def start_service(
    settings: dict[str, Any], deps: BootDeps | None = None, *, wait: bool = True
) -> RunningService:
    """The service with engine "vllm", served over real HTTP on a free port."""
    restarts: list[str] = []
    deps = deps or BootDeps()
    deps.restart = restarts.append
    options: dict[str, Any] = {
        "engine": "vllm",
        "vllm_python": str(vllm_python()),
        "vllm_args": TEST_ARGS,
        "dtype": "bf16",
        "max_batch": 4,
        "context_tokens": 1024,
        "max_prompt_tokens": 768,
        "max_tokens_limit": 256,
        "default_max_tokens": 32,
        "logprobs_policy": "top-k:2",
    }
    app = create_app(Settings(**(options | settings)), boot_deps=deps)
    service = app.extensions["tdllm"]
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    running = RunningService(app, service, f"http://127.0.0.1:{server.port}", server, restarts)
    if wait:
        wait_until(lambda: service.state.ready or service.state.phase == "failed", START_TIMEOUT_S)
        assert service.state.ready, service.state.reason
    return running


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def plain_service() -> Iterator[RunningService]:
    # fp32: the tests ask for the greedy answer to QUESTION, whose first token is a near tie
    # ("The" vs "L", 0.08-0.13 nats apart): vLLM's bf16 kernels on an Intel Xeon with AMX pick
    # "L" and answer "L'Étoile, ..." where the AMD EPYC's said "The capital of France is
    # Paris."; fp32 on the Xeon says that too (measured 2026-12-05), with fp32's rounding far
    # below the tie's margin
    running = start_service({"dtype": "fp32"})
    yield running
    running.stop()
