"""gunicorn settings for `tdllm serve` (``gunicorn -c python:tdllm.api.gunicorn_conf``).

One worker, many threads: the model and its KV cache exist once per process, so more workers
would multiply memory for no throughput (the engine thread batches every request anyway). The
gthread worker's main loop keeps heartbeating while threads stream, so long generations do not
trip `timeout`. The app is not preloaded: the model loads (and the TD attests) in the worker.

A thread reads a request with a blocking socket and no timeout of its own: gthread waits for a
new connection's first byte (5 s) without one, but once a byte is in, a client sending one byte
of headers or body every few seconds would hold the thread for ever (slow loris; `threads` such
clients stop the service). `ReadDeadlineWorker` gives every request `request_read_timeout_s`
from its first byte to its last: headers still missing then close the connection; a body still
missing is a 408 from the app (werkzeug sees the read fail). The deadline bounds each attacker
connection, not the number of them: per-client connection limits belong in front of the TD.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from gunicorn.http.errors import NoMoreData  # type: ignore[import-untyped]
from gunicorn.workers.gthread import ThreadWorker  # type: ignore[import-untyped]

from tdllm.api import gunicorn_hooks
from tdllm.api.logs import logging_config
from tdllm.settings import load_settings

_settings = load_settings()
log = logging.getLogger("tdllm.api")


class ReadDeadlineError(NoMoreData, TimeoutError):  # type: ignore[misc]
    """The request's read deadline passed.

    A `NoMoreData` so that gthread closes the connection quietly when headers are still
    missing; a `TimeoutError` so that werkzeug (body reads), gunicorn's keep-alive drain and
    `tdllm.api.errors` all read it as a timeout.
    """


class _DeadlineSocket:
    """A client socket whose every `recv` ends by the deadline of the request being read; the
    rest of the socket (sends, selectors, close) is the socket itself."""

    def __init__(self, sock: Any, timeout_s: float) -> None:
        self._sock = sock
        self._timeout_s = timeout_s
        self._deadline: float | None = None

    def arm(self) -> None:
        """A new request: its deadline starts with the next byte read."""
        self._deadline = None

    def recv(self, size: int, *flags: int) -> bytes:
        if self._deadline is None:
            self._deadline = time.monotonic() + self._timeout_s
        remaining = self._deadline - time.monotonic()
        prior = self._sock.gettimeout()
        try:
            if remaining <= 0:
                raise TimeoutError
            # a shorter timeout already set (gunicorn's keep-alive drain) still applies
            self._sock.settimeout(remaining if prior is None else min(prior, remaining))
            data: bytes = self._sock.recv(size, *flags)
            return data
        except TimeoutError:
            log.warning("a client sent its request too slowly: cut off after %gs", self._timeout_s)
            raise ReadDeadlineError() from None
        finally:
            self._sock.settimeout(prior)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class ReadDeadlineWorker(ThreadWorker):  # type: ignore[misc]
    """gthread, with a read deadline per request (see the module docstring)."""

    def handle(self, conn: Any) -> Any:
        # gthread gives a connection to a thread for each request: its first, or the next one
        # on a kept-alive connection once bytes arrive. The parser, made on the first call,
        # reads through the wrapper from then on. (Not under gunicorn's own TLS, which needs
        # the real socket; this service does not terminate TLS in gunicorn.)
        if not conn.cfg.is_ssl and not isinstance(conn.sock, _DeadlineSocket):
            conn.sock = _DeadlineSocket(conn.sock, _settings.request_read_timeout_s)
        if isinstance(conn.sock, _DeadlineSocket):
            conn.sock.arm()
        return super().handle(conn)


bind = [f"{_settings.host}:{_settings.port}"]
workers = 1
worker_class = ReadDeadlineWorker
threads = _settings.threads
timeout = 60
# SIGTERM/Ctrl-C drain in-flight requests first (gunicorn_hooks; docs/api.md, "Shutdown")
graceful_timeout = gunicorn_hooks.graceful_timeout(_settings)
post_worker_init = gunicorn_hooks.post_worker_init
when_ready = gunicorn_hooks.when_ready
on_exit = gunicorn_hooks.on_exit
# no `gunicornc` socket: its default path ($XDG_RUNTIME_DIR or ~/.gunicorn/gunicorn.ctl) is
# shared by every gunicorn of the user, and it could stop or reload the service
control_socket_disable = True
keepalive = 5
preload_app = False
limit_request_line = 8190
limit_request_fields = 64
logconfig_dict = logging_config(_settings.log_level)
accesslog = None  # tdllm.api.logs writes one JSON line per request instead
wsgi_app = "tdllm.api.app:create_app()"
