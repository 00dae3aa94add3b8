"""HTTP/1.1 over a Unix socket, with the standard library's client.

vLLM listens only on a socket file in a private directory (mode 0700) of the TD: nothing on
the network, the host included, can connect to it, and only this service's user can.
"""

from __future__ import annotations

import http.client
import socket


class UnixHTTPConnection(http.client.HTTPConnection):
    """`http.client.HTTPConnection` whose transport is the socket file at `path`."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock
