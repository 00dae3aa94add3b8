"""`tdllm chat --e2e` over real loopback TCP, tapped: no prompt or answer plaintext on the wire,
and nothing at all for a TD the reference values do not name."""

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
from tdllm_attest.simulated import SimulatedTdxPlatform, SyntheticTdFields
from tests.api.conftest import MODEL, api_settings
from tests.api.reference_policy import write_signed_policy
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


def _run_chat(url: str, root: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TDLLM_ALLOW_SIMULATED_TDX="1")
    return subprocess.run(  # our own CLI, fixed argv
        [TDLLM, "chat", "--e2e", url, "--simulated-root", str(root), *flags, PROMPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _chat_cli(url: str, root: Path, *flags: str) -> str:
    done = _run_chat(url, root, *flags)
    assert done.returncode == 0, done.stderr
    assert "SIMULATED" in done.stderr
    return done.stdout.strip()


@pytest.fixture
def root(platform: SimulatedTdxPlatform, tmp_path: Path) -> Path:
    path = tmp_path / "root.der"
    path.write_bytes(platform.root_der)
    return path


def _policy_options(folder: Path, platform: SimulatedTdxPlatform, **fields: Any) -> list[str]:
    """--policy/--policy-key for the TD with `fields` (default: the service's own TD)."""
    policy, key = write_signed_policy(folder, platform, SyntheticTdFields(**fields))
    return ["--policy", str(policy), "--policy-key", str(key)]


@pytest.mark.parametrize("mode", ["--stream", "--no-stream"])
def test_the_tapped_wire_of_an_e2e_chat_holds_no_plaintext(
    service_port: int, platform: SimulatedTdxPlatform, tmp_path: Path, root: Path, mode: str
) -> None:
    policy = _policy_options(tmp_path, platform)
    with TcpRecorder(service_port) as tap:
        url = f"http://127.0.0.1:{tap.port}"
        answer = _chat_cli(url, root, *policy, "--max-tokens", "8", mode)
    assert len(answer) >= 8
    wire = tap.captured
    assert b"/v1/attestation" in wire and b"/v1/e2e/chat/completions" in wire
    for secret in (PROMPT, "Quillhaven", answer[:16]):
        assert not any(form in wire for form in _wire_forms(secret))
    assert b"chat.completion" not in wire and b'"content"' not in wire


def test_chat_without_reference_values_stops_before_the_network_naming_both_options(
    service_port: int, root: Path
) -> None:
    with TcpRecorder(service_port) as tap:
        done = _run_chat(f"http://127.0.0.1:{tap.port}", root, "--no-stream")
    assert done.returncode == 2 and tap.captured == b""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and "--policy FILE --policy-key" in line
    assert "--insecure-any-td" in line


@pytest.mark.parametrize(
    ("options", "says"),
    [
        pytest.param(["--policy", "POLICY"], "must be given together", id="policy without key"),
        pytest.param(
            ["--policy", "POLICY", "--policy-key", "KEY", "--insecure-any-td"],
            "contradicts",
            id="policy and insecure",
        ),
    ],
)
def test_chat_refuses_contradictory_policy_options(
    platform: SimulatedTdxPlatform, tmp_path: Path, root: Path, options: list[str], says: str
) -> None:
    policy_file, key_file = write_signed_policy(tmp_path, platform)
    files = {"POLICY": str(policy_file), "KEY": str(key_file)}
    done = _run_chat("http://127.0.0.1:9", root, *(files.get(o, o) for o in options))
    assert done.returncode == 2 and says in done.stderr


def test_chat_refuses_a_td_whose_measurements_the_policy_does_not_list(
    service_port: int, platform: SimulatedTdxPlatform, tmp_path: Path, root: Path
) -> None:
    """The service's TD is genuine but not the image the policy names: no prompt leaves."""
    policy = _policy_options(tmp_path, platform, mr_td=b"\x42" * 48)
    with TcpRecorder(service_port) as tap:
        done = _run_chat(f"http://127.0.0.1:{tap.port}", root, *policy, "--no-stream")
    assert done.returncode == 4, done.stderr
    assert "error: attestation refused: not the TD of policy" in done.stderr
    assert "mr_td: found" in done.stderr
    assert b"/v1/attestation" in tap.captured and b"/v1/e2e" not in tap.captured
    assert b"Quillhaven" not in tap.captured


def test_chat_with_insecure_any_td_answers_but_warns_the_td_was_not_checked(
    service_port: int, root: Path
) -> None:
    url = f"http://127.0.0.1:{service_port}"
    done = _run_chat(url, root, "--insecure-any-td", "--no-stream", "--max-tokens", "2")
    assert done.returncode == 0, done.stderr
    assert "WARNING: --insecure-any-td: the TD's identity (MRTD/RTMRs) was NOT checked" in (
        done.stderr
    )


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
