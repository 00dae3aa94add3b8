"""The official `openai` client against the real service: gunicorn on a loopback port."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tdllm_lab.bench.soak import SoakConfig, soak
from tdllm_lab.local_service import LocalService

from .conftest import MODEL

API_KEY = "test-key-0123456789abcdef"
PROMPT = "The three primary colors are"
TDLLM = str(Path(sys.executable).parent / "tdllm")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    log = tmp_path_factory.mktemp("gunicorn") / "service.log"
    with LocalService(
        ready_timeout_s=150, log=log, max_batch="4", threads="8", api_keys=API_KEY
    ) as running:
        yield running


@pytest.fixture(scope="module")
def openai_client(service: LocalService) -> Iterator[OpenAI]:
    """Closed with the module: an unclosed client's pooled keep-alive connection is a
    ResourceWarning in whichever later test the garbage collector finds it."""
    with OpenAI(base_url=service.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


def test_models_list(openai_client: OpenAI) -> None:
    assert [m.id for m in openai_client.models.list()] == [MODEL]


def test_greedy_completion_equals_tdllm_generate(openai_client: OpenAI) -> None:
    result = openai_client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0
    )
    generated = subprocess.run(
        [TDLLM, "generate", PROMPT, "--temperature", "0", "--max-tokens", "12"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert result.choices[0].text == generated.removesuffix("\n")
    assert result.usage is not None and result.usage.completion_tokens == 12


def test_chat(openai_client: OpenAI) -> None:
    result = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    assert "Paris" in (result.choices[0].message.content or "")


def test_streaming_chat(openai_client: OpenAI) -> None:
    stream = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_wrong_key_raises_the_clients_authentication_error(service: LocalService) -> None:
    import openai

    bad = OpenAI(base_url=service.url + "/v1", api_key="wrong-key-0123456789", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_service_logs_are_json_without_prompt_text(service: LocalService) -> None:
    assert service.log is not None
    lines = Path(service.log).read_text().splitlines()
    assert any('"endpoint":"/v1/completions"' in line for line in lines)
    assert not any(PROMPT in line for line in lines)


@pytest.mark.slow  # a bench's own check (~10-25 s): `make test-slow`, not CI's budget
def test_soak_bench_counts_every_kind_of_client_without_errors(service: LocalService) -> None:
    config = SoakConfig(
        clients=3,
        minutes=0.25,
        max_tokens=8,
        disconnect_fraction=0.3,
        malformed_fraction=0.3,
        ramp_s=1.0,
        api_key=API_KEY,
    )
    assert service.process is not None
    report = soak(service.url, config, service.process.pid, lambda _: None)
    assert report["errors"] == {} and report["cut_streams"] == 0
    assert set(report["requests"]) == {"stream", "disconnect", "malformed"}
    assert report["completion_tokens"] > 0 and report["ttft_p50_s"] > 0
    assert report["rss_start_mib"] > 100 and report["ready_after"] == 200
    assert API_KEY not in json.dumps(report)
