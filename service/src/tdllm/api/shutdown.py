"""The service's stop: drain, then end what is left (docs/api.md, "Shutdown").

On SIGTERM (or a first SIGINT) the worker (`gunicorn_hooks`) calls `Drain.run`: from that moment
`/ready` answers 503 ``draining`` (a load balancer stops sending), the OpenAI routes answer new
requests 503 ``shutting_down`` with a Retry-After, and requests already admitted run on; when
the last one finishes, or `drain_timeout_s` passes, the engine thread stops and ends whatever
is still outstanding (a stream's final event is an error in OpenAI's shape, then ``[DONE]``; a
whole answer is a 503). Then gunicorn's own graceful stop writes out the last bytes and exits.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from flask import Flask, Response

from tdllm.api.errors import ApiError

if TYPE_CHECKING:
    from tdllm.api.boot import BootState

log = logging.getLogger("tdllm.api.shutdown")
# what a refused client is told to wait: long enough for a load balancer to have moved on, or
# for a supervisor to have restarted the service on its way up
RETRY_AFTER_S = 5


class Drain:
    """Whether the service is stopping, and the stop itself (`run`, once)."""

    def __init__(self) -> None:
        self._started = threading.Event()
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        return self._started.is_set()

    def begin(self) -> bool:
        """Mark the service as stopping; True for the first caller only."""
        with self._lock:
            first = not self._started.is_set()
            self._started.set()
        return first

    def run(self, state: BootState, timeout_s: float) -> None:
        """Stop admitting, let admitted requests finish for up to `timeout_s`, end the rest,
        stop the engine thread. Returns when the engine is stopped (or never ran)."""
        self.begin()
        state.stop_booting()
        state.metrics.ready.set(0)
        runner = state.runner
        if runner is None or not runner.alive or runner.failed is not None:
            log.info("stopping: no engine serving (boot phase %s)", state.phase)
            return
        runner.stop_admitting()
        log.info("draining: %d requests in flight, up to %gs", runner.outstanding, timeout_s)
        if runner.wait_idle(timeout_s):
            log.info("drained: every request finished")
        else:
            log.warning(
                "drain timeout (%gs): ending %d requests still running",
                timeout_s,
                runner.outstanding,
            )
        runner.stop(
            reason=f"the service shut down before this request finished "
            f"(drain timeout {timeout_s:g}s)"
        )


def draining(service: Any) -> bool:
    """Whether /ready says ``draining`` and the OpenAI routes refuse with ``shutting_down``: a
    drain began and the engine did not fail (a failed engine's worker also drains on its way
    to a restart, and keeps saying why it failed)."""
    runner = service.state.runner
    return bool(service.drain.started) and (runner is None or runner.failed is None)


def shutting_down(reason: str) -> ApiError:
    """The 503 of a request the stopping service cannot answer (Retry-After: `install`)."""
    return ApiError(503, f"{reason}; retry shortly", "service_unavailable", None, "shutting_down")


def install(app: Flask, drain: Drain) -> None:
    """While draining, every 503 tells the client when to retry (the openai client honours it)."""

    @app.after_request
    def _retry_after(response: Response) -> Response:
        if response.status_code == 503 and drain.started:
            response.headers.setdefault("Retry-After", str(RETRY_AFTER_S))
        return response
