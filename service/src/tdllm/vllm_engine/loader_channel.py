"""The loader channel: the data key to vLLM's loading process, and the load's outcome back.

vLLM on CPU starts its engine and worker processes with multiprocessing's *spawn*, which passes
no inherited descriptor on, so the key cannot ride a pipe into the process that loads the
weights. It goes over a one-shot Unix socket instead, in the child's private run directory
(mode 0700, in memory): the service accepts one connection, and only from a process of its own
user that descends from the vLLM child it started (SO_PEERCRED, then the /proc parent chain),
sends the key's 32 bytes (none for a plain model) and half-closes; the loader reads them to
end-of-file, loads, and writes one JSON line back, ``{"loaded": <tensors>}`` or
``{"failed": "<reason>"}``, which /ready shows when the load failed. Then the socket is gone.
Never in argv, the environment or a file; never a second time.

On a cluster node (docs/scale-out.md) the stage that loads runs under the TD's Ray node, not
under the service: there `tdllm cluster run` serves the key (`tdllm.vllm_engine.stage_keys`)
and names its socket in `NODE_KEY_CHANNEL_ENV`, which the loader prefers over this channel.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tdllm.errors import ModelLoadError
from tdllm.sealing.keys import wipe

KEY_BYTES = 32
# set by `tdllm cluster run` for the Ray node it starts: where this TD's stages take the key
NODE_KEY_CHANNEL_ENV = "TDLLM_NODE_KEY_CHANNEL"
_MAX_STATUS = 4096
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
_ANCESTRY_DEPTH = 8


class ChannelError(ModelLoadError):
    """The key did not arrive as sent, or the channel is not there."""


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ")"
    return int(stat.rpartition(")")[2].split()[1])


def descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(_ANCESTRY_DEPTH):
        if pid == ancestor:
            return True
        parent = _parent(pid)
        if parent is None or parent <= 1:
            return False
        pid = parent
    return False


class LoaderChannel:
    """The service's end: serves `key` once to the loader of the child `child_pid`."""

    def __init__(self, path: Path, key: bytearray | None) -> None:
        self.path = path
        self._key = key
        self.child_pid: int | None = None  # set once the child runs; no peer passes before
        self.outcome: dict[str, Any] | None = None
        self.refused = 0  # connections from processes that are not the child's
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._closed = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, name="tdllm-loader-channel", daemon=True
        )

    def start(self) -> LoaderChannel:
        self._listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self._listener.listen(4)
        self._listener.settimeout(0.5)
        self._thread.start()
        return self

    def failure(self) -> str | None:
        outcome = self.outcome or {}
        failed = outcome.get("failed")
        if failed is None:
            return None
        return "".join(c if c.isprintable() else "?" for c in str(failed))[:300]

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
        if self._key is not None:
            wipe(self._key)
            self._key = None

    def _serve(self) -> None:
        for connection in accepted(self._listener, self._closed):
            with connection:
                if not self._from_child(connection):
                    self.refused += 1
                    continue
                outcome = self._hand_over(connection)
                self.close()  # one loader, once: gone before anyone learns the outcome
                self.outcome = outcome
                return

    def _from_child(self, connection: socket.socket) -> bool:
        return self.child_pid is not None and peer_descends_from(connection, self.child_pid)

    def _hand_over(self, connection: socket.socket) -> dict[str, Any]:
        key, self._key = self._key, None
        return hand_over(connection, key)


def accepted(listener: socket.socket, closed: threading.Event) -> Iterator[socket.socket]:
    """Connections to `listener` (its timeout set) until `closed` is set or it is closed."""
    while not closed.is_set():
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        yield connection


def peer_credentials(connection: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, from the kernel (SO_PEERCRED)."""
    raw = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, _gid = _PEERCRED.unpack(raw)
    return pid, uid


def peer_descends_from(connection: socket.socket, ancestor: int) -> bool:
    """The peer runs as our user and descends from `ancestor` (SO_PEERCRED, /proc)."""
    pid, uid = peer_credentials(connection)
    return uid == os.getuid() and descends_from(pid, ancestor)


def hand_over(connection: socket.socket, key: bytearray | None) -> dict[str, Any]:
    """Send `key` (wiped after; None: no bytes, a plain model or a refusal), half-close, and
    wait for the loader's one-line outcome."""
    try:
        if key is not None:
            try:
                connection.sendall(key)  # from the bytearray itself: no copy left to wipe
            finally:
                wipe(key)
        connection.shutdown(socket.SHUT_WR)
        connection.settimeout(None)  # the load takes as long as it takes; stop() ends it
        status = b""
        while b"\n" not in status and len(status) < _MAX_STATUS:
            part = connection.recv(_MAX_STATUS)
            if not part:
                break
            status += part
    except OSError:
        status = b""
    try:
        outcome = json.loads(status.split(b"\n")[0])
    except ValueError:
        outcome = None
    if not isinstance(outcome, dict):
        outcome = {"failed": "the loader ended without reporting its outcome"}
    return outcome


# -- the loader's end (in vLLM's worker) ----------------------------------------------------------


def loader_socket(
    service_channel: str | None, *, sealed: bool, environ: Mapping[str, str] = os.environ
) -> str | None:
    """Where a loader takes the key and reports to. In a cluster node's Ray tree (`tdllm cluster
    run` sets `NODE_KEY_CHANNEL_ENV` there) the service's channel is another TD's socket: a
    sealed stage takes its own TD's stage-key socket, a plain one talks to no one. Else the
    service's channel (None: vLLM started by hand)."""
    node = environ.get(NODE_KEY_CHANNEL_ENV)
    if node:
        return node if sealed else None
    return service_channel


def receive_key(path: str) -> tuple[socket.socket, bytearray]:
    """Connect, and read the key to end-of-file: (the connection, for `report`; the key, empty
    for a plain model). Exactly `KEY_BYTES` or none, else `ChannelError`."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(path)
        key = bytearray()
        while len(key) <= KEY_BYTES:
            part = connection.recv(KEY_BYTES + 1 - len(key))
            if not part:
                break
            key += part
    except OSError as exc:
        connection.close()
        raise ChannelError(f"cannot reach the service's loader channel: {exc.strerror}") from None
    if len(key) not in (0, KEY_BYTES):
        connection.close()
        wipe(key)
        raise ChannelError(f"the loader channel sent {len(key)} bytes, not a {KEY_BYTES}-byte key")
    return connection, key


def report(connection: socket.socket, status: dict[str, Any]) -> None:
    """The load's outcome, one JSON line, then close."""
    with connection:
        connection.sendall((json.dumps(status) + "\n").encode())
