"""Who a client is, and a bounded fixed-window request counter per client.

The broker has no client authentication (the TD proves itself with a quote, after the fact), so
a client is its address. `X-Forwarded-For` is believed only when the direct peer is a configured
trusted proxy, and then only up to the right-most hop no trusted proxy vouches for: everything
left of that hop was written by the client itself. Time comes from an injected clock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import TYPE_CHECKING

from tdllm_attest.broker.problems import RateLimited

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
UNKNOWN_CLIENT = "unknown"
IPV6_CLIENT_PREFIX = 64  # one site (one customer) gets a /64: rotating inside it is free


def _parse(text: str | None) -> IPAddress | None:
    """The address in `text` (IPv4-mapped IPv6 unwrapped), or None when it is not one."""
    try:
        address = ip_address((text or "").strip())
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in trusted)


def client_address(peer: str | None, forwarded: str | None, trusted: Sequence[IPNetwork]) -> str:
    """The client's address: `peer`, or the right-most `forwarded` hop that is not trusted.

    Walks `X-Forwarded-For` from the right while each hop is a trusted proxy (as nginx's
    real_ip_recursive does). An unparsable entry stops the walk at the hop that reported it, so
    a client can never choose its own key by sending garbage.
    """
    current = _parse(peer)
    if current is None:
        return (peer or "").strip() or UNKNOWN_CLIENT
    if not trusted or not _is_trusted(current, trusted) or not forwarded:
        return str(current)
    for entry in reversed(forwarded.split(",")):
        hop = _parse(entry)
        if hop is None:
            break
        current = hop
        if not _is_trusted(hop, trusted):
            break
    return str(current)


class ForwardedClient:
    """WSGI middleware: REMOTE_ADDR becomes `client_address` (the direct peer is kept as
    ``tdllm.peer_addr``), so the rate limit and the audit log both see the real client."""

    PEER_KEY = "tdllm.peer_addr"

    def __init__(self, app: WSGIApplication, trusted: Sequence[IPNetwork]) -> None:
        self.app = app
        self.trusted = tuple(trusted)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        peer = environ.get("REMOTE_ADDR")
        environ[self.PEER_KEY] = peer
        forwarded = environ.get("HTTP_X_FORWARDED_FOR")  # repeated headers arrive joined by ","
        environ["REMOTE_ADDR"] = client_address(peer, forwarded, self.trusted)
        return self.app(environ, start_response)


def rate_limit_key(client: str) -> str:
    """The bucket a client address counts against: IPv4 whole, IPv6 by its /64."""
    address = _parse(client)
    if address is None:
        return UNKNOWN_CLIENT
    if isinstance(address, IPv6Address):
        return str(IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False))
    return str(address)


class RateLimiter:
    """At most `limit` requests per client in each `window`, for at most `max_clients` clients.

    The table is ordered by window start, so expired counters sit at its front and are dropped
    first. When it is still full, the oldest live counter goes: that client gets a fresh budget.
    This is acceptable because forgetting one requires `max_clients` other clients inside one
    window, each of which already has its own `limit`: eviction cannot multiply what a flood of
    addresses can send, while refusing newcomers instead would lock out every honest client.
    """

    def __init__(
        self,
        now: Callable[[], datetime],
        limit: int,
        window: timedelta,
        max_clients: int = 10_000,
    ) -> None:
        if max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        self._now = now
        self._limit = limit
        self._window = window
        self._max = max_clients
        self._counts: OrderedDict[str, tuple[datetime, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._counts)

    def hit(self, client: str) -> None:
        """Count one request from `client`; raise `RateLimited` past the limit."""
        now = self._now()
        with self._lock:
            self._drop_expired(now)
            start, count = self._counts.get(client, (now, 0))
            if now - start >= self._window:
                start, count = now, 0
            if count == 0:  # a new window starts: it is the youngest, so it moves to the back
                self._counts.pop(client, None)
                self._make_room()
            self._counts[client] = (start, count + 1)
        if count + 1 > self._limit:
            raise RateLimited(f"client {client} made {count + 1} requests in {self._window}")

    def _drop_expired(self, now: datetime) -> None:
        while self._counts:
            start, _ = next(iter(self._counts.values()))
            if now - start < self._window:
                return
            self._counts.popitem(last=False)

    def _make_room(self) -> None:
        while len(self._counts) >= self._max:
            self._counts.popitem(last=False)
