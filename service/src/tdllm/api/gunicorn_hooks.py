"""gunicorn hooks that turn SIGTERM and Ctrl-C into a drain (`shutdown`), for `tdllm serve`
(gunicorn_conf) and `tdllm appliance` alike.

gunicorn alone: SIGTERM to the master is a graceful stop (it closes its listeners, sends the
worker SIGTERM, waits `graceful_timeout`, then SIGKILLs); SIGINT and SIGQUIT are a quick one (the
worker gets SIGQUIT and exits at once). The gthread worker's own SIGTERM stops accepting at once
and waits for open connections; its SIGINT/SIGQUIT exit at once. So a stream in flight at Ctrl-C
would be cut, and a request arriving while a stream finished would be refused at the TCP level.

With these hooks:

* worker (`post_worker_init`): SIGTERM, and a first SIGINT, start the drain on a thread of its
  own; the worker keeps accepting meanwhile, so new requests get a 503 in OpenAI's shape and
  `/ready` says ``draining``. When the drain is over, gthread's own graceful stop runs. A second
  SIGINT exits at once (gunicorn's quick exit).
* master (`when_ready`): a first SIGINT is a SIGTERM (graceful); a second is gunicorn's SIGINT
  (quick: the worker gets SIGQUIT, then SIGKILL after 2 s), and the master then exits 130
  (`on_exit`), as a shell reports a process stopped by Ctrl-C.

A terminal's Ctrl-C reaches master and worker together (one process group): the worker starts
draining on its own SIGINT, and the master's SIGTERM finds it draining already.
`graceful_timeout` must cover the drain: `DRAIN_GRACE_S` beyond `drain_timeout_s`.
"""

from __future__ import annotations

import logging
import math
import queue
import signal
import threading
from types import FrameType
from typing import Any

from tdllm.settings import Settings

log = logging.getLogger("tdllm.api.shutdown")
# after the drain: the last events written, kept-alive connections closed (gthread lingers 2 s)
DRAIN_GRACE_S = 10.0


def graceful_timeout(settings: Settings) -> int:
    """gunicorn's graceful_timeout: the master SIGKILLs a worker still alive after it."""
    return math.ceil(settings.drain_timeout_s + DRAIN_GRACE_S)


class _WorkerStop:
    """The worker's SIGTERM/SIGINT handlers and the thread that drains.

    Handlers run on the main thread between any two bytecodes, possibly while it holds a lock
    (starting a thread takes one): so they only put the signal on a `SimpleQueue` (reentrant by
    design) for a thread started beforehand.
    """

    def __init__(self, worker: Any, service: Any) -> None:
        self.worker = worker
        self.service = service
        self.interrupts = 0
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        threading.Thread(target=self._drain, name="tdllm-drain", daemon=True).start()

    def on_term(self, signum: int, _frame: FrameType | None) -> None:
        self.signals.put(signum)

    def on_int(self, signum: int, frame: FrameType | None) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            self.signals.put(signum)
        else:
            self.worker.handle_quit(signum, frame)  # gunicorn's: at once

    def _drain(self) -> None:
        signum = self.signals.get()
        log.info("%s: draining", signal.Signals(signum).name)
        try:
            self.service.drain.run(self.service.state, self.service.settings.drain_timeout_s)
        except Exception:  # the stop must go on: gunicorn's graceful stop follows regardless
            log.exception("the drain failed")
        finally:
            self.worker.handle_exit(signal.SIGTERM, None)  # stop accepting, finish, exit


def post_worker_init(worker: Any) -> None:
    """In the worker, once the app is loaded and before it accepts: the drain handlers. (A
    signal before this finds no request to drain; gunicorn's own handlers then suffice.)"""
    service = getattr(worker.wsgi, "extensions", {}).get("tdllm")
    if service is None:  # not our app
        return
    stop = _WorkerStop(worker, service)
    signal.signal(signal.SIGTERM, stop.on_term)
    signal.signal(signal.SIGINT, stop.on_int)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn had it: no EINTR in request I/O


class _MasterInterrupts:
    count = 0


def when_ready(server: Any) -> None:
    """In the master, after gunicorn's own handlers: a first SIGINT drains like SIGTERM."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        _MasterInterrupts.count += 1
        server.signal(signal.SIGTERM if _MasterInterrupts.count == 1 else signum, frame)

    signal.signal(signal.SIGINT, interrupt)


def on_exit(_server: Any) -> None:
    """The master's last act: a stop forced by a second Ctrl-C exits 130, not 0."""
    if _MasterInterrupts.count > 1:
        raise SystemExit(130)
