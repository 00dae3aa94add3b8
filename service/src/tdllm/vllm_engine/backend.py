"""`VllmBackend`: what the API holds in place of the tdllm engine's runner when engine = "vllm".

It answers the questions the rest of the service asks of any engine (the model's name, how it
is protected, whether it is alive or failed, how many requests are in flight, drain and stop)
and hands out connections to vLLM's socket; the OpenAI routes relay requests through them
(`tdllm.api.openai.relay`). A watcher thread notices vLLM exiting on its own: the backend
fails (so /ready turns 503 with the reason) and `on_exit` asks for a fresh worker, which boots
from scratch: attests again and takes the key again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from tdllm.idle_wait import wait_for_idle
from tdllm.vllm_engine.child import VllmProcess
from tdllm.vllm_engine.socket_http import UnixHTTPConnection

log = logging.getLogger("tdllm.vllm")


class Refused(Exception):  # noqa: N818  # reads as the state it reports
    """A request cannot start: ``overloaded`` (429), ``draining`` or ``stopped`` (503)."""

    def __init__(self, why: str, message: str) -> None:
        super().__init__(message)
        self.why = why


class InFlight:
    """One request's connection to vLLM; `end` (idempotent) closes it and uncounts it."""

    def __init__(self, connection: UnixHTTPConnection, ended: Callable[[], None]) -> None:
        self.connection = connection
        self._ended: Callable[[], None] | None = ended

    def end(self) -> None:
        """Mid-stream, closing the socket makes vLLM abort the request (a cancellation)."""
        self.connection.close()
        ended, self._ended = self._ended, None
        if ended is not None:
            ended()


class VllmBackend:
    """The `vllm` engine behind the front."""

    engine_name = "vllm"

    def __init__(
        self,
        process: VllmProcess,
        *,
        model_name: str,
        max_model_len: int,
        vocab_size: int,
        capacity: int,
        protection: Mapping[str, object],
        on_exit: Callable[[str], None] | None = None,
    ) -> None:
        self.process = process
        self.model_name = model_name
        self.max_model_len = max_model_len
        # token ids run 0..vocab_size-1 (the larger of the model's and the tokenizer's, as vLLM
        # counts): the front refuses any other before vLLM sees it (/detokenize)
        self.vocab_size = vocab_size
        self.capacity = capacity  # requests in flight (vLLM queues beyond its batch)
        self.protection = dict(protection)
        self.failed: str | None = None
        self._on_exit = on_exit
        self._outstanding = 0
        self._admitting = True
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._watcher = threading.Thread(target=self._watch, name="tdllm-vllm-watch", daemon=True)

    def start_watching(self) -> VllmBackend:
        self._watcher.start()
        return self

    # -- what the service asks of any engine ------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.process.alive and not self.process.stopping

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def stop_admitting(self) -> None:
        with self._lock:
            self._admitting = False

    def wait_idle(self, timeout_s: float) -> bool:
        return wait_for_idle(self._idle, lambda: self._outstanding, lambda: self.alive, timeout_s)

    def stop(self, timeout_s: float = 5.0, reason: str | None = None) -> None:
        """Stop vLLM; streams still open end when their connection closes."""
        self.stop_admitting()
        self.process.stop(max(timeout_s, 1.0))

    # -- requests ---------------------------------------------------------------------------------

    def begin(self, timeout_s: float) -> InFlight:
        """A connection for one request, counted until `InFlight.end`."""
        with self._lock:
            if self.failed is not None or not self.alive:
                raise Refused("stopped", self.failed or "the vLLM engine is not running")
            if not self._admitting:
                raise Refused("draining", "the service is shutting down and takes no new requests")
            if self._outstanding >= self.capacity:
                raise Refused("overloaded", "the service is at capacity")
            self._outstanding += 1
        return InFlight(UnixHTTPConnection(self.process.socket_path, timeout_s), self._ended)

    def _ended(self) -> None:
        with self._lock:
            self._outstanding -= 1
            if self._outstanding == 0:
                self._idle.notify_all()

    # -- the watcher ------------------------------------------------------------------------------

    def _watch(self) -> None:
        process = self.process.process
        if process is None:
            return
        code = process.wait()
        if self.process.stopping:
            return
        reason = f"the vLLM engine exited (code {code})"
        with self._lock:
            self.failed = reason
        log.error("%s; failing its requests", reason)
        self.process.stop()
        if self._on_exit is not None:
            self._on_exit(reason)
