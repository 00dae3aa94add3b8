"""The soak bench's own judgement: a stream cut mid-body is counted as cut, a 5xx answer to a
malformed body is an error, and it never aims at another machine."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tdllm.errors import UsageError
from tdllm_lab.bench.soak import (
    SoakConfig,
    Tally,
    full_stream,
    malformed,
    require_loopback,
    soak,
)

FIRST_CHUNK = b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\n'


class _Broken(BaseHTTPRequestHandler):
    """Streams one chunk and hangs up (POST), or answers every request with a 500."""

    def do_POST(self) -> None:  # the stdlib's name
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        if b'"stream": true' in body:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(FIRST_CHUNK) + 100))  # promises more
            self.end_headers()
            self.wfile.write(FIRST_CHUNK)
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": {"message": "internal error"}}')

    def do_GET(self) -> None:  # /v1/models (the soak asks which model) and /ready
        body = b'{"data": [{"id": "m"}]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def broken_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Broken)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_stream_cut_mid_body_is_counted_as_cut(broken_url: str) -> None:
    tally = Tally()
    with requests.Session() as http:
        full_stream(http, broken_url, "m", "hello", 8, tally)
    assert tally.kinds == {"stream": 1}
    assert sum(n for e, n in tally.errors.items() if e.startswith("cut_stream")) == 1


def test_a_server_error_for_a_malformed_body_is_an_error(broken_url: str) -> None:
    tally = Tally()
    with requests.Session() as http:
        malformed(http, broken_url, "m", random.Random(0), tally)  # noqa: S311
    assert tally.kinds == {"malformed": 1}
    [(error, count)] = tally.errors.items()
    assert count == 1 and error.endswith("http_500")


@pytest.mark.slow  # a bench's own check (~10-25 s): `make test-slow`, not CI's budget
def test_what_goes_wrong_during_the_warm_up_counts_as_an_error(broken_url: str) -> None:
    """The warm-up is not measured for speed or RSS, but a cut stream there is still one."""
    config = SoakConfig(
        clients=1, minutes=0.02, disconnect_fraction=0, malformed_fraction=0, ramp_s=0, warm_up_s=1
    )
    report = soak(broken_url, config, None, lambda _: None)
    warm_cuts = sum(report["warm_up"]["errors"].values())
    assert warm_cuts > 3  # the three first requests and the warm-up's own, all cut
    assert (
        report["cut_streams"] == report["error_count"] == warm_cuts + sum(report["errors"].values())
    )


@pytest.mark.parametrize(
    "url", ["http://10.0.0.5:8000", "https://example.com", "http://0.0.0.0:80"]
)
def test_refuses_to_load_a_service_on_another_machine(url: str) -> None:
    with pytest.raises(UsageError, match="loopback"):
        require_loopback(url)
