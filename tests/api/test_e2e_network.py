"""`tdllm chat --e2e` and the torch-free `tdllm-chat` (the same command) over real loopback TCP,
tapped: no prompt, answer or API key in clear on the wire, nothing at all for a TD the reference
values do not name, and the client's own collateral (a PCCS) over whatever the host serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from tdllm.api.app import create_app
from tdllm.api.boot import BootDeps
from tdllm.api.runner import EngineRunner
from tdllm_attest.pccs_server import LoopbackPccs
from tdllm_attest.testing.platform import SimulatedTdxPlatform, SyntheticTdFields
from tdllm_attest.testing.provider import SimulatedProvider
from tests.api.conftest import MODEL, api_settings
from tests.api.tcp_recorder import TcpRecorder
from tests.client.reference_policy import write_signed_policy

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
TDLLM = str(Path(sys.executable).with_name("tdllm"))
TDLLM_CHAT = str(Path(sys.executable).with_name("tdllm-chat"))
COMMANDS = {"tdllm chat": (TDLLM, "chat"), "tdllm-chat": (TDLLM_CHAT,)}
PROMPT = "Tell me about the purple zebra of Quillhaven"
API_KEY = "chat-cli-api-key-" + "k" * 16


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(datetime.now(UTC))


@contextmanager
def _serving(
    runner: EngineRunner,
    platform: SimulatedTdxPlatform,
    collateral: Callable[[bytes], str] | None,
    **settings: Any,
) -> Iterator[int]:
    """The service on a loopback port, serving `collateral` (what its host hands it) or none."""
    deps = BootDeps(quote_provider=SimulatedProvider(platform), collateral=collateral)
    config = api_settings(attestation="simulated", allow_simulated=True, **settings)
    server = make_server(
        "127.0.0.1", 0, create_app(config, engine_runner=runner, boot_deps=deps), threaded=True
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port
    finally:
        server.shutdown()


@pytest.fixture
def service_port(runner: EngineRunner, platform: SimulatedTdxPlatform) -> Iterator[int]:
    with _serving(runner, platform, lambda _quote: platform.collateral_json()) as port:
        yield port


def _wire_forms(text: str) -> list[bytes]:
    # JSON bodies escape non-ASCII (e.g. an en dash becomes \u2013), so look for both forms
    return [text.encode(), json.dumps(text)[1:-1].encode()]


def _run_chat(
    url: str,
    root: Path,
    *flags: str,
    command: tuple[str, ...] = COMMANDS["tdllm chat"],
    api_key: str | None = None,
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TDLLM_ALLOW_SIMULATED_TDX="1")
    env.pop("TDLLM_API_KEY", None)
    if api_key is not None:
        env["TDLLM_API_KEY"] = api_key
    return subprocess.run(  # our own CLI, fixed argv
        [*command, "--e2e", url, "--simulated-root", str(root), *flags, PROMPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _chat_cli(url: str, root: Path, *flags: str, **options: Any) -> str:
    done = _run_chat(url, root, *flags, **options)
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


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
@pytest.mark.parametrize("mode", ["--stream", "--no-stream"])
def test_the_tapped_wire_of_an_e2e_chat_holds_no_plaintext(
    service_port: int,
    platform: SimulatedTdxPlatform,
    tmp_path: Path,
    root: Path,
    mode: str,
    command: tuple[str, ...],
) -> None:
    policy = _policy_options(tmp_path, platform)
    with TcpRecorder(service_port) as tap:
        url = f"http://127.0.0.1:{tap.port}"
        answer = _chat_cli(url, root, *policy, "--max-tokens", "8", mode, command=command)
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
        pytest.param(
            ["--insecure-any-td", "--pccs", "http://127.0.0.1:9", "--collateral", "POLICY"],
            "at most one of --pccs URL or --collateral FILE",
            id="pccs and collateral file",
        ),
        pytest.param(
            ["--insecure-any-td", "--cache-dir", "CACHE"],
            "--cache-dir is only used with --pccs",
            id="cache dir without pccs",
        ),
    ],
)
def test_chat_refuses_contradictory_policy_options(
    platform: SimulatedTdxPlatform, tmp_path: Path, root: Path, options: list[str], says: str
) -> None:
    policy_file, key_file = write_signed_policy(tmp_path, platform)
    files = {"POLICY": str(policy_file), "KEY": str(key_file), "CACHE": str(tmp_path)}
    done = _run_chat("http://127.0.0.1:9", root, *(files.get(o, o) for o in options))
    assert done.returncode == 2 and says in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ")


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


# -- tdllm-chat: own collateral, the API key ---------------------------------------------------


def test_tdllm_chat_with_its_own_pccs_ignores_forged_collateral_the_host_serves(
    runner: EngineRunner, platform: SimulatedTdxPlatform, tmp_path: Path, root: Path
) -> None:
    """The host serves collateral signed by another PKI: refused as served, irrelevant with a
    PCCS of the client's own."""
    forged = SimulatedTdxPlatform(datetime.now(UTC)).collateral_json()
    policy = _policy_options(tmp_path, platform)
    chat = COMMANDS["tdllm-chat"]
    with _serving(runner, platform, lambda _quote: forged) as port:
        url = f"http://127.0.0.1:{port}"
        refused = _run_chat(url, root, *policy, "--no-stream", command=chat)
        assert refused.returncode == 4, refused.stderr
        assert refused.stderr.strip().splitlines()[-1].startswith("error: attestation refused: ")
        with LoopbackPccs(platform.collateral_json) as pccs:
            own = ["--pccs", pccs.url, "--cache-dir", str(tmp_path / "cache")]
            answer = _chat_cli(url, root, *policy, *own, "--max-tokens", "4", command=chat)
            assert any("/tcb?fmspc=" in path for path in pccs.requests)
    assert answer


def test_tdllm_chat_names_its_own_collateral_options_when_the_service_serves_none(
    runner: EngineRunner, platform: SimulatedTdxPlatform, tmp_path: Path, root: Path
) -> None:
    policy = _policy_options(tmp_path, platform)
    chat = COMMANDS["tdllm-chat"]
    with _serving(runner, platform, None) as port:
        url = f"http://127.0.0.1:{port}"
        refused = _run_chat(url, root, *policy, "--no-stream", command=chat)
        collateral = tmp_path / "collateral.json"
        collateral.write_text(platform.collateral_json(), encoding="utf-8")
        own = ["--collateral", str(collateral), "--max-tokens", "4"]
        answer = _chat_cli(url, root, *policy, *own, "--no-stream", command=chat)
    assert refused.returncode == 4 and "Traceback" not in refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("error: attestation refused: the service served no collateral")
    assert "--pccs URL" in line and "--collateral FILE" in line
    assert answer


def test_tdllm_chat_seals_the_api_key_from_the_environment_and_never_sends_it_in_clear(
    runner: EngineRunner, platform: SimulatedTdxPlatform, tmp_path: Path, root: Path
) -> None:
    policy = _policy_options(tmp_path, platform)
    chat = COMMANDS["tdllm-chat"]
    served = lambda _quote: platform.collateral_json()  # noqa: E731
    with _serving(runner, platform, served, api_keys=(API_KEY,)) as port:
        with TcpRecorder(port) as tap:
            url = f"http://127.0.0.1:{tap.port}"
            answer = _chat_cli(
                url, root, *policy, "--max-tokens", "4", command=chat, api_key=API_KEY
            )
            keyless = _run_chat(url, root, *policy, "--no-stream", command=chat)
    assert answer
    assert API_KEY.encode() not in tap.captured and b"Authorization" not in tap.captured
    assert keyless.returncode == 1
    assert keyless.stderr.strip().splitlines()[-1].startswith("error: the service answered 401")
