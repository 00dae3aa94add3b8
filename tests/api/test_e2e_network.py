"""`tdllm chat --e2e` over real loopback TCP, tapped: no prompt or answer plaintext on the wire."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from tdllm.api.app import create_app
from tdllm.api.boot import BootDeps
from tdllm.api.runner import EngineRunner
from tdllm_attest.quote import SimulatedProvider
from tdllm_attest.simulated import SimulatedTdxPlatform
from tests.api.conftest import MODEL, api_settings
from tests.api.tcp_recorder import TcpRecorder

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
TDLLM = str(Path(sys.executable).with_name("tdllm"))
PROMPT = "Tell me about the purple zebra of Quillhaven"


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(datetime.now(UTC))


@pytest.fixture
def service_port(runner: EngineRunner, platform: SimulatedTdxPlatform) -> Iterator[int]:
    deps = BootDeps(
        quote_provider=SimulatedProvider(platform),
        collateral=lambda _quote: platform.collateral_json(),
    )
    settings = api_settings(attestation="simulated", allow_simulated=True)
    server = make_server(
        "127.0.0.1", 0, create_app(settings, engine_runner=runner, boot_deps=deps), threaded=True
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_port
    server.shutdown()


def _wire_forms(text: str) -> list[bytes]:
    # JSON bodies escape non-ASCII (e.g. an en dash becomes \u2013), so look for both forms
    return [text.encode(), json.dumps(text)[1:-1].encode()]


def _chat_cli(url: str, root: Path, *flags: str) -> str:
    env = dict(os.environ, TDLLM_ALLOW_SIMULATED_TDX="1")
    done = subprocess.run(  # our own CLI, fixed argv
        [TDLLM, "chat", "--e2e", url, "--simulated-root", str(root), *flags, PROMPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "SIMULATED" in done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("mode", ["--stream", "--no-stream"])
def test_the_tapped_wire_of_an_e2e_chat_holds_no_plaintext(
    service_port: int, platform: SimulatedTdxPlatform, tmp_path: Path, mode: str
) -> None:
    root = tmp_path / "root.der"
    root.write_bytes(platform.root_der)
    with TcpRecorder(service_port) as tap:
        answer = _chat_cli(f"http://127.0.0.1:{tap.port}", root, "--max-tokens", "8", mode)
    assert len(answer) >= 8
    wire = tap.captured
    assert b"/v1/attestation" in wire and b"/v1/e2e/chat/completions" in wire
    for secret in (PROMPT, "Quillhaven", answer[:16]):
        assert not any(form in wire for form in _wire_forms(secret))
    assert b"chat.completion" not in wire and b'"content"' not in wire


def test_the_tap_does_see_plaintext_when_the_plain_api_is_used(service_port: int) -> None:
    # the control: the same tap on the plain endpoint captures prompt and answer, so the
    # assertions above would catch a leak
    with TcpRecorder(service_port) as tap:
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 8,
            "temperature": 0,
        }
        resp = requests.post(
            f"http://127.0.0.1:{tap.port}/v1/chat/completions", json=body, timeout=60
        )
    answer = resp.json()["choices"][0]["message"]["content"]
    assert PROMPT.encode() in tap.captured
    assert any(form in tap.captured for form in _wire_forms(answer[:16]))
