"""A loopback TCP relay that records every byte in both directions: the test's "network tap"."""

from __future__ import annotations

import socket
import threading
from types import TracebackType


class TcpRecorder:
    """``with TcpRecorder(upstream_port) as tap:`` clients connect to ``tap.port``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._captured = bytearray()
        self._threads: list[threading.Thread] = []

    @property
    def captured(self) -> bytes:
        with self._lock:
            return bytes(self._captured)

    def __enter__(self) -> TcpRecorder:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=10)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed by __exit__
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            for src, dst in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    self._captured += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):  # one side closed: end the other direction too
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
