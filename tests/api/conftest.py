"""Fixtures for the service tests: one bundled-model engine per session, apps around it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tdllm.api.app import create_app
from tdllm.api.runner import EngineRunner
from tdllm.engine import Engine
from tdllm.model.loader import load_model
from tdllm.settings import Settings
from tdllm.sources import open_checkpoint

MODEL = "SmolLM2-135M-Instruct"
CONTEXT = 512


@pytest.fixture(scope="session")
def runner() -> Iterator[EngineRunner]:
    """The bundled model (fp32) on a running engine thread, shared by every app of the session."""
    net, checkpoint = load_model(open_checkpoint("bundled"))
    # prompts prefilled in chunks, as the service does (`prefill_chunk`), small enough that
    # every chat prompt here takes several: streams, stops, grammars and logprobs through chunks
    engine = Engine(net, checkpoint.tokenizer, max_batch=4, max_seq_len=CONTEXT, prefill_chunk=16)
    running = EngineRunner(engine, model_name=MODEL, queue_size=4).start()
    yield running
    running.stop()


def api_settings(**changes: Any) -> Settings:
    base: dict[str, Any] = {
        "max_batch": 4,
        "context_tokens": CONTEXT,
        "max_prompt_tokens": 256,
        "max_tokens_limit": 128,
        "default_max_tokens": 16,
        "queue_size": 4,
        "max_body_bytes": 16 * 1024,
    }
    return Settings(**(base | changes))


@pytest.fixture
def make_app(runner: EngineRunner) -> Callable[..., Flask]:
    def make(**changes: Any) -> Flask:
        return create_app(api_settings(**changes), engine_runner=runner)

    return make


@pytest.fixture
def client(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app().test_client()
