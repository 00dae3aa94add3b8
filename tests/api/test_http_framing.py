"""Against real gunicorn on loopback, what the HTTP server decides before the app sees a request:
chunked bodies over `max_body_bytes` (413), malformed chunked framing (400, not 500), and
slow-loris clients (headers or body trickled byte by byte), which must lose their thread after
`request_read_timeout_s` (408 where a body was started). Every answer is in OpenAI's error shape.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tdllm_lab.local_service import LocalService

from .conftest import MODEL
from .test_malformed_input import COMPLETIONS, SECRET

READ_TIMEOUT_S = 2.0
BODY_LIMIT = 4096


class _BootingService(LocalService):
    """Real gunicorn with a model that cannot load: the worker answers at once (boot fails in
    a second, /ready says so) and every request is read and validated exactly as when ready."""

    ready_path = "/health"


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalService, Path]]:
    log = tmp_path_factory.mktemp("gunicorn") / "service.log"
    with _BootingService(
        ready_timeout_s=60,
        log=log,
        model=str(tmp_path_factory.mktemp("no-model") / "missing.gguf"),
        threads="2",
        max_body_bytes=str(BODY_LIMIT),
        request_read_timeout_s=str(READ_TIMEOUT_S),
    ) as service:
        yield service, log


def _connect(service: LocalService) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of one HTTP/1.1 answer (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), json.loads(rest[:length])


def _chunked(body: bytes, size: int = 1024) -> bytes:
    parts = [
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


def _head(path: str, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _openai_error(status: int, body: dict[str, Any], want: int) -> dict[str, Any]:
    assert status == want, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


def test_a_chunked_body_over_max_body_bytes_is_413(gunicorn: tuple[LocalService, Path]) -> None:
    body = json.dumps({"model": MODEL, "prompt": "x" * (4 * BODY_LIMIT)}).encode()
    with _connect(gunicorn[0]) as sock:
        sock.sendall(_head(COMPLETIONS, "Transfer-Encoding: chunked") + _chunked(body))
        error = _openai_error(*_answer(sock), 413)
    assert error["code"] == "request_too_large"


def test_a_chunked_body_under_the_limit_is_read_and_validated(
    gunicorn: tuple[LocalService, Path],
) -> None:
    body = b'{"model": "%s", "prompt": "\\ud800"}' % MODEL.encode()
    with _connect(gunicorn[0]) as sock:
        sock.sendall(_head(COMPLETIONS, "Transfer-Encoding: chunked") + _chunked(body, 7))
        error = _openai_error(*_answer(sock), 400)
    assert error["param"] == "prompt"


def test_malformed_chunked_framing_is_400_not_500(gunicorn: tuple[LocalService, Path]) -> None:
    with _connect(gunicorn[0]) as sock:
        sock.sendall(_head(COMPLETIONS, "Transfer-Encoding: chunked") + b"zz\r\n{}\r\n0\r\n\r\n")
        _openai_error(*_answer(sock), 400)


def _trickle(socks: list[socket.socket], data: bytes, every_s: float, limit_s: float) -> float:
    """Send `data` a byte every `every_s` on each socket until the service answers or closes
    every one of them (or `limit_s` passes); the seconds that took."""
    started = time.monotonic()
    alive = list(socks)
    for i in range(len(data)):
        if not alive or time.monotonic() - started > limit_s:
            break
        readable, _, _ = select.select(alive, [], [], every_s)
        alive = [s for s in alive if s not in readable]
        for sock in list(alive):
            try:
                sock.sendall(data[i : i + 1])
            except OSError:  # reset by the service
                alive.remove(sock)
    assert not alive, "a slow client kept its thread"
    return time.monotonic() - started


def test_slow_loris_headers_lose_their_thread_after_the_read_timeout(
    gunicorn: tuple[LocalService, Path],
) -> None:
    """As many slow clients as threads, each trickling header bytes: without a read deadline
    they hold every thread for as long as they like; with it, each is cut off."""
    service, log = gunicorn
    slow = [_connect(service) for _ in range(2)]
    try:
        request = _head(COMPLETIONS, "X-Padding: " + "a" * 400)
        took = _trickle(slow, request, every_s=0.2, limit_s=READ_TIMEOUT_S + 8)
        assert took < READ_TIMEOUT_S + 8
        assert all(sock.recv(1) == b"" for sock in slow)  # closed without an answer
    finally:
        for sock in slow:
            sock.close()
    assert requests.get(service.url + "/health", timeout=10).status_code == 200
    assert "Traceback" not in log.read_text()


def test_a_body_trickled_slower_than_the_read_timeout_is_cut_off_with_408(
    gunicorn: tuple[LocalService, Path],
) -> None:
    service, log = gunicorn
    body = json.dumps({"model": MODEL, "prompt": SECRET}).encode()
    with _connect(service) as sock:
        sock.sendall(_head(COMPLETIONS, f"Content-Length: {len(body)}"))
        took = _trickle([sock], body, every_s=0.2, limit_s=READ_TIMEOUT_S + 8)
        error = _openai_error(*_answer(sock), 408)
    assert took < READ_TIMEOUT_S + 3
    assert error["code"] == "request_timeout"
    assert requests.get(service.url + "/health", timeout=10).status_code == 200
    text = log.read_text()
    assert SECRET not in text and "Traceback" not in text
