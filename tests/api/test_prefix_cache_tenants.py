"""The prefix cache across API keys: a client learns nothing from its time to first token about
what another key's clients sent (their cached blocks are not its to hit), while each key's own
requests share their system prompt."""

from __future__ import annotations

from tdllm.api.app import create_app
from tdllm.api.runner import EngineRunner
from tdllm.engine import Engine

from .conftest import CONTEXT, MODEL, api_settings

KEY_A, KEY_B = "tenant-a-key-0123456789", "tenant-b-key-0123456789"
SYSTEM = "You are the support assistant of a company that makes bicycles. " * 12


def test_another_keys_identical_prompt_never_hits_the_cached_blocks(runner: EngineRunner) -> None:
    shared = runner.engine
    cached = Engine(shared.model, shared.tokenizer, 2, CONTEXT, prefix_cache_blocks=16)
    own = EngineRunner(cached, model_name=MODEL, queue_size=2).start()
    try:
        client = create_app(api_settings(api_keys=(KEY_A, KEY_B)), engine_runner=own).test_client()

        def ask(key: str, question: str) -> None:
            body = {
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": question},
                ],
                "max_tokens": 2,
            }
            headers = {"Authorization": f"Bearer {key}"}
            resp = client.post("/v1/chat/completions", json=body, headers=headers)
            assert resp.status_code == 200, resp.get_data(as_text=True)

        prefix = cached.prefix_cache
        assert prefix is not None
        ask(KEY_A, "Which frame size fits me?")
        assert prefix.hit_tokens == 0
        ask(KEY_B, "Which frame size fits me?")  # the prober's guess: the victim's very prompt
        assert prefix.hit_tokens == 0
        ask(KEY_A, "Do you ship abroad?")
        assert prefix.hit_tokens >= 128  # the victim's own system prompt, two blocks or more
    finally:
        own.stop()
