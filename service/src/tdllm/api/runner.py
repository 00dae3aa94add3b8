"""One thread owns the engine; request threads talk to it through queues.

`Engine` is not thread-safe, and batching only happens if one loop sees every request: so the
runner's thread admits new requests, applies cancellations, and calls `Engine.step()` while any
sequence is running, which decodes all running sequences together (continuous batching). Each
request gets a `RequestHandle` whose queue receives its `StepOutput`s. Admission is bounded in
sequences, a request counting its `n` choices: beyond ``max_batch + queue_size`` outstanding
sequences `submit` raises `Overloaded` (a 429). The prompts of one API request (a list prompt)
are submitted together (`submit_all`): all are queued or none, and their outputs arrive on one
queue (`merged_outputs`). A choice's sequence is released when it finishes; a cancel releases
the request's unfinished ones.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from tdllm.engine import Engine, SamplingParams
from tdllm.engine.outputs import StepOutput
from tdllm.idle_wait import wait_for_idle
from tdllm.profiles.base import ServedModel
from tdllm.trusted.errors import DeviceIntegrityError

log = logging.getLogger("tdllm.api.runner")
_IDLE_POLL_S = 0.25
TD_ONLY: Mapping[str, object] = {"profile": "td-only", "device": None, "k": None}


class Overloaded(Exception):  # noqa: N818  # reads as the state it reports
    """Too many requests are outstanding; the caller should answer 429."""


class RunnerStopped(Exception):  # noqa: N818
    """The engine thread is gone (shutdown or a failed step); the request cannot finish."""


class ShuttingDown(RunnerStopped):
    """The service is stopping: a new request is refused (`stop_admitting`), or one still
    outstanding when the engine is stopped is ended (`stop`, at the drain deadline)."""


@dataclass
class RunnerStats:
    """Counters for tests and metrics; written only by the engine thread."""

    steps: int = 0
    max_decode_batch: int = 0  # most sequences ever decoded in one step
    admitted: int = 0
    cancelled: int = 0


@dataclass
class StepObserver:
    """Hooks the metrics module plugs in (all optional; called on the engine thread)."""

    on_step: Callable[[int, int, int], None] = lambda decoding, running, waiting: None
    on_tokens: Callable[[int], None] = lambda n: None
    # the engine stopped for good: (reason, whether an untrusted device failed an integrity check)
    on_failure: Callable[[str, bool], None] = lambda reason, integrity: None


Event = tuple["RequestHandle", StepOutput | BaseException]


class RequestHandle:
    """A submitted request (one prompt, `params.n` choices) as its HTTP thread sees it."""

    def __init__(
        self,
        runner: EngineRunner,
        prompt: Sequence[int],
        params: SamplingParams,
        events: queue.SimpleQueue[Event] | None = None,
    ) -> None:
        self.runner = runner
        self.prompt = list(prompt)
        self.params = params
        # shared by the handles of one `submit_all`: their outputs in the order they came
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue() if events is None else events
        self.remaining = params.n  # choices not finished yet (the HTTP thread's count)
        self.finished = False

    def put(self, item: StepOutput | BaseException) -> None:
        self.events.put((self, item))

    def outputs(self, timeout_s: float) -> Iterator[StepOutput]:
        """Yield step outputs until every choice carried a finish reason; cancels if abandoned
        early."""
        for _, out in merged_outputs([self], timeout_s):
            yield out

    def cancel(self) -> None:
        if not self.finished:
            self.finished = True
            self.runner._inbox.put(("cancel", self))


def merged_outputs(
    handles: Sequence[RequestHandle], timeout_s: float
) -> Iterator[tuple[RequestHandle, StepOutput]]:
    """The outputs of `handles` (one `submit_all`: one queue) as they come, each with its
    handle, until every choice of every handle finished. An error of one ends them all; so does
    abandoning the generator (client went away, timeout): what is unfinished is cancelled."""
    deadline = time.monotonic() + timeout_s
    events = handles[0].events
    if any(h.events is not events for h in handles):
        raise ValueError("merged_outputs takes the handles of one submit_all")
    try:
        while not all(h.finished for h in handles):
            try:
                handle, item = events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError("generation timed out") from None
            if isinstance(item, BaseException):
                handle.finished = True
                raise item
            if item.finish_reason is not None:
                handle.remaining -= 1
                handle.finished = handle.remaining == 0
            yield handle, item
    finally:
        for handle in handles:
            if not handle.finished:
                handle.cancel()


class EngineRunner:
    """Drives `engine` on a dedicated thread; `submit` from any thread."""

    engine_name = "tdllm"

    def __init__(
        self,
        engine: Engine,
        *,
        model_name: str,
        queue_size: int = 32,
        observer: StepObserver | None = None,
        protection: Mapping[str, object] | None = None,
        served: ServedModel | None = None,
    ) -> None:
        self.engine = engine
        # the profile's model, crossing and idle work (None: a bare model, td-only)
        self.served = served
        self.model_name = model_name
        # how the model is protected, for /v1/models: profile, untrusted device, K
        self.protection = dict(protection or TD_ONLY)
        self.capacity = len(engine.free_slots) + queue_size
        self.observer = observer or StepObserver()
        self.stats = RunnerStats()
        self._inbox: queue.SimpleQueue[tuple[str, RequestHandle]] = queue.SimpleQueue()
        self._outstanding = 0
        self._lock = threading.Lock()
        self._by_id: dict[int, RequestHandle] = {}
        self._ids: dict[int, int] = {}  # id(handle) -> engine request id
        self._live: dict[int, int] = {}  # engine request id -> choices not finished
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tdllm-engine", daemon=True)
        self.failed: str | None = None
        self._admitting = True  # False once a drain began
        self._idle = threading.Condition(self._lock)  # notified when nothing is outstanding
        self._stop_reason = "the engine stopped before this request finished"

    # -- any thread -------------------------------------------------------------------------------

    def start(self) -> EngineRunner:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0, reason: str | None = None) -> None:
        """Stop the engine thread; requests still outstanding end with `ShuttingDown(reason)`."""
        if reason is not None:
            self._stop_reason = reason
        self.stop_admitting()  # nothing may slip into the inbox after the thread emptied it
        self._stop.set()
        self._thread.join(timeout_s)

    def stop_admitting(self) -> None:
        """A drain begins: `submit` raises `ShuttingDown` from now on; what runs, runs on."""
        with self._lock:
            self._admitting = False

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is outstanding (or the engine thread is gone); False if
        `timeout_s` passed first."""
        return wait_for_idle(self._idle, lambda: self._outstanding, lambda: self.alive, timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def max_model_len(self) -> int:
        """Tokens of prompt and completion together a sequence may hold."""
        return self.engine.max_seq_len

    @property
    def outstanding(self) -> int:
        """Sequences submitted and not finished (a request counts its `n` choices)."""
        return self._outstanding

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> RequestHandle:
        """Queue a request (prompt already checked against the engine's limits)."""
        return self.submit_all([prompt], params)[0]

    def submit_all(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[RequestHandle]:
        """Queue one request per prompt, all or none (`Overloaded` unless their
        ``len(prompts) * params.n`` sequences fit); their outputs share one queue."""
        if not self.alive:
            raise RunnerStopped(self.failed or "the engine is not running")
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        handles = [RequestHandle(self, prompt, params, events) for prompt in prompts]
        sequences = len(handles) * params.n
        with self._lock:  # against `_fail`: a request is refused, or queued before its drain
            if self.failed is not None:
                raise RunnerStopped(self.failed)
            if not self._admitting:
                raise ShuttingDown("the service is shutting down and takes no new requests")
            if self._outstanding + sequences > self.capacity:
                raise Overloaded()
            self._outstanding += sequences
            for handle in handles:
                self._inbox.put(("submit", handle))
        return handles

    # -- the engine thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        idle_work = self.served.idle_work() if self.served is not None else None
        try:
            while not self._stop.is_set():
                # idle: one short slice of the model's background work (masked: precompute
                # pads) between polls, so a new request waits at most one slice
                busy_idle = not self.engine.has_work and idle_work is not None and idle_work()
                self._drain_inbox(block=not self.engine.has_work and not busy_idle)
                if self.engine.has_work:
                    self._step()
            self._end_outstanding()
        except DeviceIntegrityError as exc:  # a lying device: stop serving this model for good
            self._fail(f"integrity failure: {exc}", integrity=True)
        except ConnectionError as exc:  # the device link: our own words, no request content
            self._fail(f"untrusted device lost: {exc}", integrity=False)
        except Exception as exc:  # a failed step must not leave requests waiting forever
            self._fail(f"engine step failed ({type(exc).__name__})", integrity=False)
        finally:
            self._stop.set()

    def _fail(self, reason: str, *, integrity: bool) -> None:
        """Record why the engine stopped, alert, and fail every outstanding request.

        The reason and the log carry the error's own text (which slots, which projection),
        never request content.
        """
        with self._lock:  # from here on `submit` refuses, so the drain below misses no request
            self.failed = reason
        fields = {"model": self.model_name, "failed_requests": len(self._by_id)}
        if integrity:
            fields |= {"alert": "device_integrity", "profile": self.protection.get("profile")}
            log.critical("ALERT: %s; serving stopped", reason, extra={"fields": fields})
        else:
            log.error("%s; failing %d requests", reason, len(self._by_id), extra={"fields": fields})
        try:
            self.observer.on_failure(reason, integrity)
        finally:
            waiting = []  # submitted during the failed step: the engine never saw them
            while True:
                try:
                    action, handle = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if action == "submit":
                    waiting.append(handle)
            for handle in [*self._by_id.values(), *waiting]:
                handle.put(RunnerStopped(reason))

    def _drain_inbox(self, *, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=_IDLE_POLL_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, action: str, handle: RequestHandle) -> None:
        if action == "submit":
            if handle.finished:  # cancelled before the engine saw it
                self._release(handle.params.n)
                return
            try:
                request_id = self.engine.submit(handle.prompt, handle.params)
            except Exception as exc:  # a prompt the engine refuses: fail this request only
                handle.put(exc)
                self._release(handle.params.n)
                return
            self._by_id[request_id] = handle
            self._ids[id(handle)] = request_id
            self._live[request_id] = handle.params.n
            self.stats.admitted += 1
        else:
            request_id = self._ids.pop(id(handle), -1)
            if self._by_id.pop(request_id, None) is not None:
                self.engine.cancel(request_id)  # every choice of it
                self.stats.cancelled += 1
                self._release(self._live.pop(request_id))

    def _step(self) -> None:
        decoding = len(self.engine.running)
        outputs = self.engine.step()
        self.stats.steps += 1
        self.stats.max_decode_batch = max(self.stats.max_decode_batch, decoding)
        self.observer.on_step(decoding, len(self.engine.running), len(self.engine.waiting))
        self.observer.on_tokens(len(outputs))
        for out in outputs:
            handle = self._by_id.get(out.request_id)
            if handle is None:
                continue
            handle.put(out)
            if out.finish_reason is not None:  # one choice's sequence is done
                self._release(1)
                self._live[out.request_id] -= 1
                if not self._live[out.request_id]:
                    del self._by_id[out.request_id], self._live[out.request_id]
                    self._ids.pop(id(handle), None)

    def _end_outstanding(self) -> None:
        """`stop` was called: every request still running or queued ends with `ShuttingDown`,
        so no HTTP thread waits out its timeout for an engine that is gone."""
        ended = [(h, self._live[i]) for i, h in self._by_id.items()]
        self._by_id.clear()
        self._ids.clear()
        self._live.clear()
        while True:
            try:
                action, handle = self._inbox.get_nowait()
            except queue.Empty:
                break
            if action == "submit" and handle.finished:  # cancelled before the engine saw it
                self._release(handle.params.n)
            elif action == "submit":
                ended.append((handle, handle.params.n))
            # a "cancel" is for a request ended above (or already released)
        for handle, unfinished in ended:
            handle.put(ShuttingDown(self._stop_reason))
            self._release(unfinished)

    def _release(self, sequences: int) -> None:
        with self._lock:
            self._outstanding -= sequences
            if self._outstanding == 0:
                self._idle.notify_all()
