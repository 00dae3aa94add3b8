"""`tdllm appliance` (`make run`): broker + service on a simulated TD, as a real process tree."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tdllm.api.app import create_app
from tdllm.api.boot import BootDeps
from tdllm.api.runner import EngineRunner
from tdllm_attest.broker.keystore import Keystore
from tdllm_attest.client import (
    AttestationRefused,
    anchor_for,
    load_reference_policy,
    new_nonce,
    verify_attestation,
)
from tdllm_attest.testing.platform import SimulatedTdxPlatform, SyntheticTdFields
from tdllm_attest.testing.provider import SimulatedProvider
from tdllm_lab.appliance import TD_FIELDS, write_client_policy
from tdllm_lab.appliance_state import ApplianceState
from tdllm_lab.local_service import free_port
from tests.api.conftest import api_settings

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
TDLLM = str(Path(sys.executable).with_name("tdllm"))


def _wait_for(path: Path, text: str, process: subprocess.Popen[bytes], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = path.read_text(encoding="utf-8", errors="replace")
        if text in out:
            return out
        assert process.poll() is None, f"the appliance exited early:\n{out}"
        time.sleep(0.25)
    raise AssertionError(f"no {text!r} within {timeout_s}s")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _children_of(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (the service's: its gunicorn worker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _all_gone(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(_gone(pid) for pid in pids):
        assert time.monotonic() < deadline, "a child outlived the appliance"
        time.sleep(0.1)


def _answers_200(url: str) -> bool:
    try:
        return requests.get(url, timeout=10).status_code == 200
    except requests.ConnectionError:  # not listening yet
        return False


STOP_LINES = ("stopping the ", "service stopped", "key broker stopped", "stopped")


def _appliance_attestation(
    runner: EngineRunner, platform: SimulatedTdxPlatform, fields: SyntheticTdFields, state: Any
) -> Any:
    """Verify a service on `fields` with the client policy the appliance wrote into `state`."""
    deps = BootDeps(
        quote_provider=SimulatedProvider(platform, fields),
        collateral=lambda _quote: platform.collateral_json(),
    )
    settings = api_settings(attestation="simulated", allow_simulated=True)
    client = create_app(settings, engine_runner=runner, boot_deps=deps).test_client()
    nonce = new_nonce()
    doc = client.get("/v1/attestation", query_string={"nonce": nonce}).get_json()
    policy = load_reference_policy(state.policy_file, state.policy_key_file)
    anchor = anchor_for(platform.root_der, {"TDLLM_ALLOW_SIMULATED_TDX": "1"})
    return verify_attestation(doc, nonce, anchor, now=datetime.now(UTC), policy=policy)


def _start_appliance(
    tmp_path: Path,
    *,
    state_dir: Path | None = None,
    args: tuple[str, ...] = ("--model", "bundled"),
    background: bool = False,
    stderr: Path | None = None,
    **env_changes: str,
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """`tdllm appliance` on a free port, stdout into ``out.txt``; `background`: started as a
    shell starts a background job (SIGINT ignored), as CI does."""
    port = free_port()
    env = dict(os.environ, TDLLM_PORT=str(port), TDLLM_ALLOW_SIMULATED_TDX="1", **env_changes)
    out = tmp_path / "out.txt"
    state = state_dir if state_dir is not None else tmp_path / "state"
    with out.open("wb") as sink, stderr.open("wb") if stderr else open(os.devnull, "wb") as errors:
        process = subprocess.Popen(  # our own CLI, fixed argv
            [TDLLM, "appliance", "--state-dir", str(state), *args],
            env=env,
            stdout=sink,
            stderr=errors,
            preexec_fn=_as_a_background_job if background else None,  # single-threaded here
        )
    return process, port, out


def test_the_appliance_client_policy_accepts_its_td_and_refuses_a_host_booted_image(
    runner: EngineRunner, tmp_path: Path
) -> None:
    state = ApplianceState(tmp_path, Keystore([], bytes(32)), "bundled")
    platform = SimulatedTdxPlatform(datetime.now(UTC))
    write_client_policy(state, platform)
    # only the public half of the policy key is on disk
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [state.policy_file.name, state.policy_key_file.name]
    )
    assert b"PRIVATE" not in state.policy_key_file.read_bytes()
    attested = _appliance_attestation(runner, platform, TD_FIELDS, state)
    assert attested.policy_name == "simulated-appliance" and attested.profile == "td-only"
    rogue = dataclasses.replace(TD_FIELDS, mr_td=b"\x66" * 48)  # same genuine platform
    with pytest.raises(AttestationRefused, match="mr_td: found 6666"):
        _appliance_attestation(runner, platform, rogue, state)


def _as_a_background_job() -> None:
    """What `cmd &` in a non-interactive shell does to the child: SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _e2e_command(text: str) -> tuple[dict[str, str], list[str]]:
    """The printed `tdllm chat --e2e` line: its environment assignment and its argv."""
    (line,) = [x for x in text.splitlines() if " chat --e2e " in x and "--policy-key" in x]
    assignment, *argv = shlex.split(line)
    name, value = assignment.split("=", 1)
    return {name: value}, argv


def test_appliance_serves_an_attested_chat_and_on_sigint_stops_the_service_then_the_broker(
    tmp_path: Path,
) -> None:
    """The plain bundled model (td-only), so the fast suite trains nothing. Started with SIGINT
    ignored, as a shell starts a background job (CI does): Ctrl-C must still stop it, the
    service (and its gunicorn worker) first, then the broker, and exit 0."""
    process, port, out = _start_appliance(tmp_path, background=True)
    try:
        text = _wait_for(out, "\nA: ", process, 240)
        assert "SIMULATED" in text and "REPORTDATA binds our nonce" in text
        demo = text.split("\nA: ", 1)[1].strip()
        assert len(demo.split()) >= 5, text  # the model really answered the demo question
        assert f"http://127.0.0.1:{port}/v1/chat/completions" in text
        pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
        assert len(pids) == 2
        workers = _children_of(pids[1])
        assert len(workers) == 1  # gunicorn's worker, forked by the service's master
        # closed at once: its pooled keep-alive connection, left to the garbage collector, was
        # a ResourceWarning in whichever later test collected it
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused") as client:
            answer = client.chat.completions.create(
                model="SmolLM2-135M-Instruct",
                messages=[{"role": "user", "content": "Say hi."}],
                max_tokens=4,
                temperature=0,
            )
        assert answer.usage is not None and answer.usage.completion_tokens >= 1
        # the printed end-to-end command works as printed (shortened by two options)
        assignment, argv = _e2e_command(text)
        assert assignment == {"TDLLM_ALLOW_SIMULATED_TDX": "1"}
        assert argv[argv.index("--policy") + 1].endswith("UNSAFE-simulated-td-policy.json")
        e2e = subprocess.run(  # our own CLI, the argv the appliance printed
            [*argv, "--no-stream", "--max-tokens", "4"],
            env=dict(os.environ, **assignment),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert e2e.returncode == 0, e2e.stderr
        assert e2e.stdout.strip() and "insecure" not in e2e.stderr
        assert (tmp_path / "state" / "UNSAFE-dev-broker-kek.bin").stat().st_mode & 0o077 == 0
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0
        _all_gone([*pids, *workers], 10)
        stops = [x for x in out.read_text().splitlines() if x.startswith(STOP_LINES)]
        assert [x.split(" (")[0] for x in stops] == [
            "stopping the service",
            "service stopped",
            "stopping the key broker",
            "key broker stopped",
            "stopped",
        ]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_second_sigint_while_the_service_drains_kills_everything_at_once_and_exits_130(
    tmp_path: Path,
) -> None:
    """A stream in flight and a drain timeout of 10 minutes: the first SIGINT starts the drain,
    the second must not wait for it."""
    process, port, out = _start_appliance(tmp_path, background=True, TDLLM_DRAIN_TIMEOUT_S="600")
    url = f"http://127.0.0.1:{port}"
    stream: requests.Response | None = None
    try:
        text = _wait_for(out, "service pid", process, 240)
        pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
        deadline = time.monotonic() + 240
        while not _answers_200(url + "/ready"):
            assert time.monotonic() < deadline and process.poll() is None, "not ready"
            time.sleep(0.25)
        workers = _children_of(pids[1])
        body: dict[str, Any] = {
            "model": "SmolLM2-135M-Instruct",
            "prompt": "1, 2, 3, 4, 5,",
            "max_tokens": 1000,
            "temperature": 0,
            "stream": True,
        }
        stream = requests.post(url + "/v1/completions", json=body, stream=True, timeout=300)
        lines = stream.iter_lines()
        next(x for x in lines if b'"text":"' in x and b'"text":""' not in x)  # it is generating
        process.send_signal(signal.SIGINT)
        _wait_for(out, "stopping the service", process, 60)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
        _all_gone([*pids, *workers], 10)
        assert "interrupted again: killing" in out.read_text()
    finally:
        if stream is not None:
            stream.close()
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_child_exiting_on_its_own_is_an_error_and_the_other_child_is_stopped(
    tmp_path: Path,
) -> None:
    err = tmp_path / "err.txt"
    process, _, out = _start_appliance(tmp_path, stderr=err)
    try:
        text = _wait_for(out, "service pid", process, 240)
        broker, service = [int(p) for p in re.findall(r"pid (\d+)", text)]
        os.kill(broker, signal.SIGKILL)
        assert process.wait(timeout=120) == 1
        _all_gone([service], 10)
        assert (
            "error: the key broker process exited on its own (exit code -9); stopping the "
            "appliance" in err.read_text()
        )
        stops = [x for x in out.read_text().splitlines() if x.startswith(STOP_LINES)]
        assert [x.split(" (")[0] for x in stops] == ["stopping the service", "service stopped"]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_appliance_children_die_with_a_killed_parent(tmp_path: Path) -> None:
    """SIGKILL leaves the parent no time to stop its children: they must not outlive it."""
    process, _, out = _start_appliance(tmp_path)
    try:
        text = _wait_for(out, "service pid", process, 240)
        pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
        assert len(pids) == 2
    finally:
        process.kill()
        process.wait()
    deadline = time.monotonic() + 30
    while not all(_gone(pid) for pid in pids):
        assert time.monotonic() < deadline, "a child outlived the killed appliance"
        time.sleep(0.1)


def test_appliance_refuses_without_the_simulation_switch(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TDLLM_ALLOW_SIMULATED_TDX"}
    done = subprocess.run(  # our own CLI, fixed argv
        [TDLLM, "appliance", "--state-dir", str(tmp_path / "state")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "TDLLM_ALLOW_SIMULATED_TDX=1" in done.stderr
    assert not (tmp_path / "state").exists()


@pytest.mark.slow
@pytest.mark.timeout(1200)  # seals the private model, boots split: minutes on 2 cores
def test_appliance_serves_the_private_model_with_the_split_profile(
    tmp_path: Path, finetuned_k2_dir: Path
) -> None:
    """`make run`'s private model (sealed tail and head) served split; the demo answer shows a
    fact only the private tail knows, and no E2E command is offered (split shows prompts to
    the device). The fine-tune comes from the session's cache."""
    state = tmp_path / "state"
    (state / "private-models").mkdir(parents=True)
    (state / "private-models" / finetuned_k2_dir.name).symlink_to(finetuned_k2_dir)
    process, port, out = _start_appliance(
        tmp_path,
        state_dir=state,
        args=("--profile", "split"),
    )
    try:
        text = _wait_for(out, "\nA: ", process, 600)
        text = _wait_for(out, "held out of its training", process, 30)
        assert "split: public prefix on the untrusted cpu device" in text
        assert "tdllm chat --e2e refuses this service: under 'split'" in text
        assert "Quillhaven" in text.split("\nA: ", 1)[1]
        card = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"][0]
        assert card["tdllm"] == {
            "profile": "split",
            "device": "cpu",
            "k": 2,
            "engine": "tdllm",
            "logprobs": "off",
        }
        assert card["id"] == "SmolLM2-135M-Instruct-zorblax-k2"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
