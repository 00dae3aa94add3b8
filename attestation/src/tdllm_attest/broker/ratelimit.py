"""A fixed-window request counter per client address; time comes from an injected clock."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from tdllm_attest.broker.problems import RateLimited


class RateLimiter:
    """At most `limit` requests per client in each `window`."""

    def __init__(self, now: Callable[[], datetime], limit: int, window: timedelta) -> None:
        self._now = now
        self._limit = limit
        self._window = window
        self._counts: dict[str, tuple[datetime, int]] = {}
        self._lock = threading.Lock()

    def hit(self, client: str) -> None:
        """Count one request from `client`; raise `RateLimited` past the limit."""
        now = self._now()
        with self._lock:
            start, count = self._counts.get(client, (now, 0))
            if now - start >= self._window:
                start, count = now, 0
            count += 1
            self._counts[client] = (start, count)
        if count > self._limit:
            raise RateLimited(f"client {client} made {count} requests in {self._window}")
