"""The model key for the vLLM stages of one cluster node, each load attested afresh.

In a cluster (docs/scale-out.md) every TD runs a Ray node, and vLLM places a pipeline stage on
it; that stage loads its own layers from the TD's own sealed copy, so it needs the data key in
this TD, not over the head's loader channel (another TD's Unix socket). `tdllm cluster run`
starts the Ray node as its child and serves this socket beside it (`NODE_KEY_CHANNEL_ENV` tells
the loader where it is). For each loader that connects, and only for one that runs as our user
inside the Ray node's process tree (SO_PEERCRED, then /proc), it attests to the key broker with
a fresh quote, sends the released key, wipes it, and waits for the loader's outcome line, as
the service's channel does. No key is held between loads: a TD whose quote stops passing the
broker's policy (a revoked TCB, a withdrawn reference value) stops getting it at its next load,
and a refusal reaches the loader as no key at all (it fails the load; vLLM does not start).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tdllm.vllm_engine.loader_channel import (
    accepted,
    hand_over,
    peer_credentials,
    peer_descends_from,
)

# one attested release per connection; a loader waits its turn (vLLM loads its stages once)
_BACKLOG = 8


class StageKeyRefused(Exception):  # noqa: N818  # reads as the event
    """The broker did not release the key for this load; the message says why (no secrets)."""


@dataclass
class StageLoad:
    """What one connection came to: the loader's outcome, or why it got no key."""

    pid: int
    outcome: dict[str, Any]


@dataclass
class StageKeyServer:
    """Serves `release()` to each loader in the process tree of `root_pid` (set once started).

    `release` runs the key-release protocol and returns a fresh copy of the key (wiped here
    after sending), or raises `StageKeyRefused`; `report` hears of every load and refusal.
    `start` listens at once (so a child started next finds the socket); connections wait in
    the backlog until `watch` names the tree's root.
    """

    path: Path
    release: Callable[[], bytearray]
    report: Callable[[StageLoad], None] = lambda _load: None
    root_pid: int | None = None
    refused: int = 0  # connections from processes outside the node's tree
    loads: list[StageLoad] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._closed = threading.Event()
        self._rooted = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tdllm-stage-keys", daemon=True)

    def start(self) -> StageKeyServer:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a socket left by a killed run: no one listens on it
        self._listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self._listener.listen(_BACKLOG)
        self._listener.settimeout(0.5)
        self._thread.start()
        return self

    def watch(self, root_pid: int) -> None:
        """Admit loaders in the process tree of `root_pid` (the Ray node) from now on."""
        self.root_pid = root_pid
        self._rooted.set()

    def close(self) -> None:
        self._closed.set()
        self._rooted.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5.0)

    def _serve(self) -> None:
        while not self._rooted.wait(0.5):
            if self._closed.is_set():
                return
        for connection in accepted(self._listener, self._closed):
            with connection:
                self._one(connection)

    def _one(self, connection: socket.socket) -> None:
        pid, _uid = peer_credentials(connection)
        root = self.root_pid
        if root is None or not peer_descends_from(connection, root):
            self.refused += 1
            return  # closed without a byte
        try:
            key: bytearray | None = self.release()
            outcome = hand_over(connection, key)
        except StageKeyRefused as exc:
            hand_over(connection, None)  # no key: the loader fails, and says so
            outcome = {"refused": str(exc)}
        load = StageLoad(pid, outcome)
        self.loads.append(load)
        self.report(load)
