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
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any

from tdllm.errors import ModelLoadError
from tdllm.sealing.keys import wipe

KEY_BYTES = 32
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
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with connection:
                if not self._from_child(connection):
                    self.refused += 1
                    continue
                outcome = self._hand_over(connection)
                self.close()  # one loader, once: gone before anyone learns the outcome
                self.outcome = outcome
                return

    def _from_child(self, connection: socket.socket) -> bool:
        raw = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        pid, uid, _gid = _PEERCRED.unpack(raw)
        child = self.child_pid
        return uid == os.getuid() and child is not None and descends_from(pid, child)

    def _hand_over(self, connection: socket.socket) -> dict[str, Any]:
        try:
            if self._key is not None:
                connection.sendall(bytes(self._key))
                wipe(self._key)
                self._key = None
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
