"""The service's Flask app on a real loopback port, for clients that bring their own HTTP stack
(LangChain, LiteLLM: tests/api/test_langchain_client.py, test_litellm_client.py), and a guard
that turns any connection off this machine into an immediate error instead of a hang."""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask
from werkzeug.serving import make_server

from tdllm.api.app import create_app
from tdllm.api.runner import EngineRunner

from .conftest import api_settings

API_KEY = "framework-key-0123456789abcdef"


@contextmanager
def served(runner: EngineRunner, **changes: Any) -> Iterator[str]:
    """The app on the session's engine, on 127.0.0.1:<free port>; yields the `/v1` base URL.
    API key authentication is on (API_KEY): the frameworks must send it as the OpenAI SDK does."""
    settings = api_settings(api_keys=(API_KEY,), **changes)
    app: Flask = create_app(settings, engine_runner=runner)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def _is_local(address: Any) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX
        return True
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def loopback_only() -> Iterator[list[Any]]:
    """While open, a socket connecting anywhere but loopback (or a unix socket) raises at once;
    yields the list of the addresses refused, for a test to assert it stayed empty."""
    refused: list[Any] = []
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex

    def check(address: Any) -> None:
        if not _is_local(address):
            refused.append(address)
            raise ConnectionRefusedError(f"test refuses a connection off this machine: {address}")

    def connect(self: socket.socket, address: Any) -> None:
        check(address)
        original_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return original_connect_ex(self, address)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    try:
        yield refused
    finally:
        socket.socket.connect = original_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = original_connect_ex  # type: ignore[method-assign]
