"""Boot against a key broker that is down, garbled or slow: bounded retries with doubling
back-off, /ready says which attempt and why (never a secret), recovery once the broker answers
properly, a clear end when the attempts run out, and no plaintext weight on disk meanwhile.

The real broker (`tdllm_attest.broker`) serves on loopback behind `GarblingProxy`, a real HTTP
server that answers scripted requests with one fault each and passes the rest through.
"""

from __future__ import annotations

import random
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from flask import Flask

from tdllm.api import boot as boot_module
from tdllm.api.app import create_app
from tdllm.api.boot import BootDeps, BrokerTransport
from tdllm.settings import Settings
from tdllm_attest.testing.provider import SimulatedProvider
from tdllm_lab.local_service import free_port
from tests.api.test_attested_boot import Broker, seal_test_model, wait_for
from tests.attestation.simulated_broker import (
    TEST_KEY_ID,
    SimulatedDeployment,
    simulated_deployment,
    td_fields,
)
from tests.sealing.synthetic import synthetic_checkpoint
from tests.sealing.test_no_plaintext import windows

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")

MARKER = "SECRET-MARKER-7f3a"  # in the garbage bodies: must never reach /ready
BROKER_TIMEOUT_S = 1.0
NOT_JSON = f"hello {MARKER}".encode()
JSON_ARRAY = f'["{MARKER}"]'.encode()
HALF_JSON = b'{"session_id": "AAAA", "nonce": "AA'
ERROR_PAGE = f"<html><body><h1>Bad Gateway</h1>{MARKER}</body></html>".encode()


class GarblingProxy:
    """A loopback HTTP server in front of the broker: request n gets fault ``script[n]``
    ("pass" forwards it); requests beyond the script are forwarded."""

    def __init__(self, upstream: str, script: list[str]) -> None:
        self.script = list(script)
        self.seen: list[tuple[str, str]] = []  # (path, fault) per request
        self.release = threading.Event()  # lets a "slow" handler go at teardown
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:  # http.server names it
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fault = proxy.script.pop(0) if proxy.script else "pass"
                proxy.seen.append((self.path, fault))
                proxy.answer(self, fault, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.upstream = upstream
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, h: BaseHTTPRequestHandler, fault: str, body: bytes) -> None:
        if fault == "pass":
            resp = requests.post(
                self.upstream + h.path,
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=30,
            )
            self.raw(h, resp.status_code, resp.headers["Content-Type"], resp.content)
        elif fault == "not-json":
            self.raw(h, 200, "text/plain", NOT_JSON)
        elif fault == "json-array":
            self.raw(h, 200, "application/json", JSON_ARRAY)
        elif fault == "wrong-fields":
            self.raw(h, 200, "application/json", f'{{"{MARKER}": true}}'.encode())
        elif fault == "truncated-json":  # a 200 whose JSON stops half-way, length matching
            self.raw(h, 200, "application/json", HALF_JSON)
        elif fault == "cut-off":  # announces more bytes than it sends, then hangs up
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", "4096")
            h.end_headers()
            h.wfile.write(b'{"session_id": "AAAA"')
            h.wfile.flush()
            h.close_connection = True
        elif fault.startswith("html-"):  # a reverse proxy's error page
            self.raw(h, int(fault.removeprefix("html-")), "text/html", ERROR_PAGE)
        elif fault == "reset":  # RST instead of an answer
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
        elif fault == "slow":  # says nothing until long after the TD's timeout, then hangs up
            self.release.wait(BROKER_TIMEOUT_S * 5)
            h.close_connection = True
        else:
            raise AssertionError(f"unknown fault {fault}")

    @staticmethod
    def raw(h: BaseHTTPRequestHandler, status: int, content_type: str, data: bytes) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def deployment() -> SimulatedDeployment:
    return simulated_deployment()


@pytest.fixture
def broker(deployment: SimulatedDeployment) -> Iterator[Broker]:
    running = Broker(deployment, free_port())
    yield running
    running.stop()


class Booting:
    """A service booting `sealed` against `url`; the injected back-off records each wait and
    what /ready said during it, then returns at once (the test need not wait out the delays)."""

    def __init__(
        self, deployment: SimulatedDeployment, sealed: Path, url: str, **settings: Any
    ) -> None:
        self.delays: list[float] = []
        self.ready_during_waits: list[tuple[int, dict[str, Any]]] = []
        self.app_set = threading.Event()
        self.app: Flask | None = None
        options: dict[str, Any] = {
            "model": str(sealed),
            "attestation": "simulated",
            "allow_simulated": True,
            "broker_url": url,
            "broker_public_key": str(deployment.write_broker_public_key(sealed.parent)),
            "key_id": TEST_KEY_ID,
            "boot_attempts": 12,
            "boot_backoff_s": 1,
            "boot_backoff_max_s": 4,
            "context_tokens": 64,
            "max_prompt_tokens": 32,
            "max_tokens_limit": 16,
            "default_max_tokens": 8,
        } | settings
        deps = BootDeps(
            quote_provider=SimulatedProvider(deployment.platform, td_fields()),
            collateral=lambda _quote: deployment.platform.collateral_json(),
            sleep=self.back_off,
            broker_timeout_s=BROKER_TIMEOUT_S,
        )
        self.app = create_app(Settings(**options), boot_deps=deps)
        self.svc = self.app.extensions["tdllm"]
        self.app_set.set()

    def back_off(self, delay: float) -> None:
        assert self.app_set.wait(30), "create_app did not return"
        assert self.app is not None
        resp = self.app.test_client().get("/ready")
        self.ready_during_waits.append((resp.status_code, resp.get_json()))
        self.delays.append(delay)

    def finished(self) -> bool:
        return bool(self.svc.state.ready or self.svc.state.phase == "failed")

    def metric(self, outcome: str) -> float:
        value = self.svc.metrics.registry.get_sample_value(
            "tdllm_key_release_attempts_total", {"outcome": outcome}
        )
        return float(value or 0)


def plaintext_windows_on_disk(roots: list[Path]) -> list[str]:
    """Names of private tensors any 32-byte window of which is in a file under `roots`."""
    rng = random.Random(11)  # noqa: S311 - reproducible offsets, not a secret
    blobs = [p.read_bytes() for root in roots for p in root.rglob("*") if p.is_file()]
    found = []
    for name, tensor in synthetic_checkpoint().tensors():  # what seal_test_model sealed
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        if any(w in blob for w in windows(raw, rng) for blob in blobs):
            found.append(name)
    return found


def test_ready_names_each_garbled_broker_answer_and_boots_once_the_broker_answers_properly(
    deployment: SimulatedDeployment,
    broker: Broker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # anything spilled lands here
    sealed = seal_test_model(deployment, tmp_path / "sealed" / "tiny")
    broker.start()
    faults = [
        "not-json",
        "json-array",
        "wrong-fields",
        "truncated-json",
        "cut-off",
        "html-200",
        "html-502",
        "reset",
        "slow",
        "pass",  # a good challenge ...
        "html-200",  # ... then a garbled attest answer: the next attempt starts over
    ]
    proxy = GarblingProxy(f"http://127.0.0.1:{broker.port}", faults)
    try:
        boot = Booting(deployment, sealed, proxy.url)
        wait_for(boot.finished, 120)
        assert boot.svc.state.ready, boot.svc.state.reason
    finally:
        proxy.stop()

    garbled = "the key broker's answer is garbled"
    expected = [
        f"{garbled} (HTTP 200, {len(NOT_JSON)} bytes, not JSON)",
        f"{garbled} (HTTP 200, {len(JSON_ARRAY)} bytes, JSON but not an object)",
        f"{garbled} (challenge response lacks session_id / nonce)",
        f"{garbled} (HTTP 200, {len(HALF_JSON)} bytes, not JSON)",
        "the key broker's answer was cut off",
        f"{garbled} (HTTP 200, {len(ERROR_PAGE)} bytes, not JSON)",
        "key broker busy (502)",
        "key broker unreachable (ConnectionError)",
        f"the key broker did not answer within {BROKER_TIMEOUT_S:g}s",
        f"{garbled} (HTTP 200, {len(ERROR_PAGE)} bytes, not JSON)",
    ]
    assert [s for s, _ in boot.ready_during_waits] == [503] * len(expected)
    reasons = [body["reason"] for _, body in boot.ready_during_waits]
    delays = [1, 2, 4, 4, 4, 4, 4, 4, 4, 4]
    assert reasons == [
        f"{why} (attempt {n}/12); retrying in {d}s"
        for n, (why, d) in enumerate(zip(expected, delays, strict=True), 1)
    ]
    assert boot.delays == delays
    assert all(body["phase"] == "attesting" for _, body in boot.ready_during_waits)
    assert [path for path, _ in proxy.seen[-4:]] == [
        "/v1/challenge",
        "/v1/attest",  # the garbled one
        "/v1/challenge",
        "/v1/attest",
    ]
    key = bytes(deployment.data_keys[TEST_KEY_ID])
    for reason in reasons:
        assert MARKER not in reason and key.hex() not in reason
    assert boot.metric("garbled") == 7 and boot.metric("unreachable") == 2
    assert boot.metric("busy") == 1 and boot.metric("released") == 1

    client = boot.app.test_client()  # type: ignore[union-attr]
    assert client.get("/ready").status_code == 200
    done = client.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 2})
    assert done.status_code == 200
    boot.svc.state.runner.stop()
    assert plaintext_windows_on_disk([tmp_path]) == []


def test_boot_gives_up_after_its_attempts_with_a_terminal_reason(
    deployment: SimulatedDeployment, broker: Broker, tmp_path: Path
) -> None:
    """Nothing listens on the broker's port: each attempt waits twice as long as the one
    before (capped), and the last one ends the boot for good, saying what to do."""
    sealed = seal_test_model(deployment, tmp_path / "tiny")
    url = f"http://127.0.0.1:{broker.port}"  # never started
    boot = Booting(deployment, sealed, url, boot_attempts=4, boot_backoff_max_s=2)
    wait_for(boot.finished, 60)
    assert boot.svc.state.phase == "failed" and boot.svc.state.runner is None
    assert boot.delays == [1, 2, 2]
    resp = boot.app.test_client().get("/ready")  # type: ignore[union-attr]
    assert resp.status_code == 503
    assert resp.get_json() == {
        "ready": False,
        "phase": "failed",
        "reason": "key broker unreachable (ConnectionError); gave up after 4 attempts "
        "(restart the service to retry)",
    }
    assert boot.metric("unreachable") == 4 and boot.metric("released") == 0
    broker.start()  # too late: a failed boot stays failed (no key is fetched behind its back)
    assert requests.post(url + "/v1/challenge", json={}, timeout=10).status_code == 400
    assert boot.svc.state.phase == "failed" and boot.metric("released") == 0


@pytest.mark.parametrize("broker_up", [True, False])
def test_boot_closes_its_broker_connections_whether_it_got_the_key_or_gave_up(
    deployment: SimulatedDeployment,
    broker: Broker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    broker_up: bool,
) -> None:
    """The transport's pooled keep-alive connection is closed when boot is done with the broker:
    left to the garbage collector, it was a ResourceWarning in whichever test ran then."""
    made: list[BrokerTransport] = []

    class Recording(BrokerTransport):
        closed = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        def close(self) -> None:
            self.closed = True
            super().close()

    monkeypatch.setattr(boot_module, "BrokerTransport", Recording)
    if broker_up:
        broker.start()
    sealed = seal_test_model(deployment, tmp_path / "tiny")
    boot = Booting(deployment, sealed, f"http://127.0.0.1:{broker.port}", boot_attempts=2)
    wait_for(boot.finished, 60)
    assert boot.svc.state.ready is broker_up, boot.svc.state.reason
    assert made and all(t.closed for t in made)
    if broker_up:
        boot.svc.state.runner.stop()


def test_a_service_stopped_while_attesting_stops_retrying_the_broker(
    deployment: SimulatedDeployment, broker: Broker, tmp_path: Path
) -> None:
    """A service told to stop (SIGTERM's drain) while its broker is down: its boot thread used
    to go on attesting, `boot_attempts` times, for a service that was gone."""
    sealed = seal_test_model(deployment, tmp_path / "tiny")
    url = f"http://127.0.0.1:{broker.port}"  # never started
    boot = Booting(deployment, sealed, url, boot_attempts=100_000)
    wait_for(lambda: len(boot.delays) >= 2, 60)
    boot.svc.drain.run(boot.svc.state, timeout_s=1)
    stopped_at = len(boot.delays)
    boot.svc.boot.thread.join(30)
    assert not boot.svc.boot.thread.is_alive()
    assert len(boot.delays) <= stopped_at + 1  # the attempt under way, if any, and no other
    assert boot.svc.state.phase == "failed"
    assert boot.svc.state.reason == "the service stopped while attesting to the key broker"
