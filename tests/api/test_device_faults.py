"""The host kills or stops the `process` untrusted device while requests run: they end with
503 (a stream with a final error event), without hanging, /ready says why, and the service asks
its supervisor for a fresh process (under gunicorn: a new worker, which boots from scratch).

The model is a tiny private model (a 2-block Llama with an untied head, K = 1) saved as a plain
directory and served with the `split` profile on a real `process` device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

from tdllm.api.app import create_app
from tdllm.api.boot import BootDeps, supervised
from tdllm.api.runner import EngineRunner, StepObserver
from tdllm.engine import Engine
from tdllm.model.checkpoint import Checkpoint, save_hf_directory
from tdllm.model.loader import load_model
from tdllm.sources import open_checkpoint
from tdllm.trusted.crossing import Crossing
from tdllm.trusted.public_reference import PublicReference
from tdllm.trusted.split import offload_public_prefix
from tdllm.untrusted.process_device import ProcessDevice
from tdllm_lab.local_service import LocalService
from tdllm_lab.protection.private_model import privatize
from tests.api.conftest import api_settings
from tests.api.sse_frames import parse_sse
from tests.processes import children
from tests.sealing.synthetic import TINY, tiny_tokenizer
from tests.tiny_model import tiny_tensors

CFG = dataclasses.replace(TINY, tie_word_embeddings=False)  # 2 blocks, 64 character tokens
K = 1
NAME = "tiny-split"
PROMPT = "abc"  # greedy from it runs past a few tokens without an end of sequence
LIMITS = {
    "context_tokens": 64,
    "max_prompt_tokens": 16,
    "max_tokens_limit": 32,
    "default_max_tokens": 8,
}
DEADLINE_S = 60.0
KILLED = "untrusted device lost: the device process was killed by SIGKILL"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the private model's directory, the public reference of its base)."""
    folder = tmp_path_factory.mktemp("models")
    base = tiny_tensors(CFG, seed=3)
    private = privatize(base.items(), CFG, K, seed=1)
    model = folder / NAME
    save_hf_directory(
        Checkpoint(NAME, model, CFG, tiny_tokenizer(), lambda: iter(private.items())), model
    )
    reference = folder / "public-prefix.json"
    PublicReference.build("tiny-base", base.items()).save(reference)
    return model, reference


def split_settings(model_dir: tuple[Path, Path]) -> dict[str, Any]:
    model, reference = model_dir
    return {
        "model": str(model),
        "profile": "split",
        "device": "process",
        "k": K,
        "public_ref": str(reference),
    }


class Gate:
    """Holds the engine thread after a step (the runner's step hook), so a test can act while
    a request is certainly in flight."""

    def __init__(self, runner: EngineRunner) -> None:
        self.hold, self.paused, self.go = threading.Event(), threading.Event(), threading.Event()
        step = runner.observer.on_step

        def on_step(decoding: int, running: int, waiting: int) -> None:
            step(decoding, running, waiting)
            if self.hold.is_set():
                self.paused.set()
                assert self.go.wait(DEADLINE_S)

        runner.observer.on_step = on_step

    def release(self) -> None:
        self.hold.clear()
        self.go.set()


@pytest.fixture
def booted(model_dir: tuple[Path, Path]) -> Iterator[tuple[Flask, list[str]]]:
    """The service booted (the real boot) on the split model; its restarts are recorded."""
    restarts: list[str] = []
    settings = api_settings(**split_settings(model_dir), **LIMITS, request_timeout_s=DEADLINE_S)
    app = create_app(settings, boot_deps=BootDeps(restart=restarts.append))
    state = app.extensions["tdllm"].state
    deadline = time.monotonic() + DEADLINE_S * 2
    while not (state.ready or state.phase == "failed"):
        assert time.monotonic() < deadline, "boot did not finish"
        time.sleep(0.05)
    assert state.ready, state.reason
    yield app, restarts
    state.runner.stop()
    assert state.runner.served is not None
    state.runner.served.close()


def device_of(app: Flask) -> ProcessDevice:
    served = app.extensions["tdllm"].state.runner.served
    crossing = served.crossing if served is not None else None
    assert crossing is not None and isinstance(crossing.device, ProcessDevice)
    return crossing.device


def test_a_killed_device_ends_its_requests_with_503_says_why_and_asks_for_a_restart(
    booted: tuple[Flask, list[str]],
) -> None:
    app, restarts = booted
    client = app.test_client()
    runner = app.extensions["tdllm"].state.runner
    gate = Gate(runner)
    gate.hold.set()
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    answers: dict[str, Any] = {}

    def ask(name: str, **options: Any) -> threading.Thread:
        def post() -> None:
            resp = app.test_client().post("/v1/completions", json=body | options)
            answers[name] = (resp.status_code, resp.get_data(as_text=True))

        thread = threading.Thread(target=post)
        thread.start()
        return thread

    asks = [ask("stream", stream=True)]
    assert gate.paused.wait(DEADLINE_S)  # the stream's first step is done; more are due
    asks.append(ask("whole"))
    _eventually(lambda: runner.outstanding == 2)  # queued behind the held engine
    device = device_of(app)
    os.kill(device.process.pid, signal.SIGKILL)
    assert device.process.wait(DEADLINE_S) == -signal.SIGKILL
    gate.release()
    for thread in asks:
        thread.join(DEADLINE_S)

    status, text = answers["stream"]
    events, done = parse_sse(text)
    assert status == 200 and not done  # the stream had begun: the error comes in-band
    assert all("choices" in e for e in events[:-1])  # tokens, then the error
    assert events[-1]["error"]["code"] == "not_ready"
    assert events[-1]["error"]["message"] == f"the service is not ready: {KILLED}"
    status, text = answers["whole"]
    assert status == 503 and json.loads(text)["error"]["message"].endswith(KILLED)
    ready = client.get("/ready")
    assert ready.status_code == 503
    assert ready.get_json() == {"ready": False, "phase": "failed", "reason": KILLED}
    assert restarts == [KILLED]  # one failure, one request for a fresh process
    again = client.post("/v1/completions", json=body)
    assert again.status_code == 503 and again.get_json()["error"]["code"] == "not_ready"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "tdllm_ready 0.0" in metrics and "tdllm_integrity_failures_total 0.0" in metrics


def test_a_stopped_device_fails_the_request_at_its_timeout_instead_of_hanging(
    model_dir: tuple[Path, Path],
) -> None:
    """SIGSTOP: the pipes stay open and nothing comes back. The TD gives up after the device's
    timeout, kills it, and fails the request, well before the request's own timeout."""
    checkpoint = open_checkpoint(model_dir[0])
    model, _ = load_model(checkpoint)
    crossing = Crossing(device := ProcessDevice())
    runner = EngineRunner(Engine(model, checkpoint.tokenizer, 2, 64), model_name=NAME)
    try:
        reference = PublicReference.load(model_dir[1])
        model.place(offload_public_prefix(model, checkpoint, reference, crossing, K, 2, 64, 0.0))
        settings = api_settings(**LIMITS, request_timeout_s=DEADLINE_S)
        client = create_app(settings, engine_runner=runner.start()).test_client()
        device.conn.timeout_s = 2  # once loaded (its start imports torch: slow on a busy host)
        os.kill(device.process.pid, signal.SIGSTOP)
        started = time.monotonic()
        resp = client.post("/v1/completions", json={"model": NAME, "prompt": PROMPT})
        assert time.monotonic() - started < DEADLINE_S / 2
        assert resp.status_code == 503
        reason = "untrusted device lost: the device process did not answer within 2s (killed)"
        assert resp.get_json()["error"]["message"].endswith(reason)
        assert client.get("/ready").get_json()["reason"] == reason
        assert device.process.returncode == -signal.SIGKILL
    finally:
        runner.stop()
        crossing.close()


@pytest.mark.parametrize(("integrity", "restarted"), [(False, True), (True, False)])
def test_only_a_failure_that_is_not_an_integrity_failure_asks_for_a_restart(
    integrity: bool, restarted: bool
) -> None:
    """A lying device keeps the service failed: a fresh boot would trust that device again."""
    restarts: list[str] = []
    failures: list[tuple[str, bool]] = []
    observer = supervised(
        StepObserver(on_failure=lambda r, i: failures.append((r, i))), restarts.append
    )
    observer.on_failure("why", integrity)
    assert failures == [("why", integrity)]
    assert restarts == (["why"] if restarted else [])


def _worker_and_device(master: int) -> tuple[int, int]:
    (worker,) = [pid for pid, _ in children(master)]
    devices = [pid for pid, cmd in children(worker) if "tdllm.untrusted.process_device" in cmd]
    assert len(devices) == 1
    return worker, devices[0]


def _metric(service: LocalService, name: str) -> float:
    text = requests.get(service.url + "/metrics", timeout=5).text
    return float(next(ln for ln in text.splitlines() if ln.startswith(name + " ")).split()[1])


def _eventually(probe: Callable[[], Any], timeout_s: float = DEADLINE_S * 2) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if value := probe():
                return value
        except (requests.RequestException, ValueError, AssertionError):
            pass
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_under_gunicorn_a_killed_device_restarts_the_worker_which_boots_afresh(
    model_dir: tuple[Path, Path], tmp_path: Path
) -> None:
    log = tmp_path / "service.log"
    settings = {k: str(v) for k, v in (split_settings(model_dir) | LIMITS).items()}
    with LocalService(ready_timeout_s=180, log=log, threads="4", **settings) as service:
        assert service.process is not None
        master = service.process.pid
        worker, device = _worker_and_device(master)
        os.kill(device, signal.SIGSTOP)  # the next request certainly meets the device mid-call
        body: dict[str, Any] = {"model": NAME, "prompt": PROMPT, "max_tokens": 8, "stream": True}
        answer: dict[str, Any] = {}

        def ask() -> None:
            url = service.url + "/v1/completions"
            answer["resp"] = requests.post(url, json=body, timeout=DEADLINE_S)

        asking = threading.Thread(target=ask)
        asking.start()
        _eventually(lambda: _metric(service, "tdllm_prompt_tokens_total") > 0)  # submitted
        os.kill(device, signal.SIGKILL)
        asking.join(DEADLINE_S)
        events, done = parse_sse(answer["resp"].text)
        assert not done and events[-1]["error"]["message"].endswith(KILLED)

        def ready_again() -> bool:
            resp = requests.get(service.url + "/ready", timeout=5)
            return resp.status_code == 200 and _worker_and_device(master)[0] != worker

        _eventually(ready_again)
        new_worker, new_device = _worker_and_device(master)
        assert (new_worker, new_device) != (worker, device)
        done_body = body | {"stream": False}
        resp = requests.post(service.url + "/v1/completions", json=done_body, timeout=DEADLINE_S)
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] >= 1
    assert f"engine stopped ({KILLED}); restarting the worker" in log.read_text()
