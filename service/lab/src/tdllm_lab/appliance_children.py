"""The appliance's two children (key broker, service) as the parent runs them: each in a
process group of its own that dies with the parent, a stop in order (SIGTERM, wait, SIGKILL)
with one line per stage, and a second Ctrl-C that kills every remaining group at once."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import click

from tdllm.errors import TdllmError


def exit_on_signals() -> None:
    def stop(_signum: int, _frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def own_process_group(pid: int = 0) -> None:
    """Lead a process group (from the child, and from the parent too: whichever runs first
    wins the race with a `killpg`). A terminal's Ctrl-C then reaches the parent only."""
    try:
        os.setpgid(pid, pid)
    except (PermissionError, ProcessLookupError):  # the child already did, or is gone
        pass


def child_begins() -> None:
    """First thing in a child: its own process group, then the stop signals the parent blocked
    around the fork (`tdllm_lab.appliance.appliance`) unblocked."""
    own_process_group()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """A child gets SIGTERM when the appliance dies, even by SIGKILL: no orphan keeps the port
    (Linux prctl; elsewhere a no-op, and Ctrl-C still stops both children)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def check_alive(children: list[BaseProcess]) -> None:
    for child in children:
        if not child.is_alive():
            raise TdllmError(
                f"the {child.name} process exited on its own (exit code {child.exitcode}); "
                "stopping the appliance"
            )


class Signals:
    """SIGINT/SIGTERM in the parent. While `raising` (start-up, then watching the children) the
    first one raises KeyboardInterrupt, so a wait for boot or the demo answer ends at once;
    after that they are only counted, and the stop reads the count: a stop never gets an
    exception thrown into the middle of it."""

    def __init__(self) -> None:
        self.count = 0
        self.raising = True

    def __call__(self, _signum: int, _frame: Any) -> None:
        self.count += 1
        if self.raising:
            self.raising = False
            raise KeyboardInterrupt


def kill_group(child: BaseProcess) -> None:
    """SIGKILL the child's process group (the service's: gunicorn's master and worker)."""
    if child.pid is None:
        return
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:  # gone, or not a group leader yet: the child alone then
        child.kill()


@dataclass
class Stage:
    child: BaseProcess
    name: str
    doing: str  # what its stop does, for the line that announces it
    limit_s: float  # then SIGKILL


def stop_in_order(stages: list[Stage], signals: Signals) -> bool:
    """Stop each child in turn: SIGTERM, wait, SIGKILL when its time is up; one line as each
    stage begins and ends. A SIGINT/SIGTERM arriving meanwhile kills every remaining child at
    once. Returns whether the stop was forced so."""
    seen = signals.count
    for index, stage in enumerate(stages):
        child, name, limit_s = stage.child, stage.name, stage.limit_s
        if not child.is_alive() or child.pid is None:
            continue
        click.echo(f"stopping the {name}{stage.doing}")
        os.kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + limit_s
        while child.is_alive():
            if signals.count > seen:
                click.echo("interrupted again: killing the service and the key broker now")
                for later in stages[index:]:
                    kill_group(later.child)
                for later in stages[index:]:
                    if later.child.pid is not None:
                        later.child.join()
                return True
            if time.monotonic() > deadline:
                click.echo(f"the {name} did not stop within {limit_s:g}s: killing it")
                kill_group(child)
                deadline = float("inf")
            time.sleep(0.1)
        click.echo(f"{name} stopped")
    return False
