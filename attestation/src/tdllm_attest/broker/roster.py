"""The node certificates the broker issued, per key, until they expire: what `GET
/v1/cluster/nodes` serves, so that a TD finds its peers without anyone copying files into it.

Certificates are public (they hold public keys and overlay addresses); a TD trusts one only if
it chains to the cluster CA from its own signed answer, so serving them over the host's network
gives the host nothing but the choice to withhold them (availability). In memory: a restarted
broker forgets them, and nodes that joined before list themselves again when they re-join.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class RosterEntry:
    certificate: str  # PEM
    not_after: datetime


class NodeRoster:
    """At most `max_nodes` certificates per key; expired ones drop first, then the soonest to
    expire (a flood of joins needs a verified quote for each, so this bounds memory only)."""

    def __init__(self, now: Callable[[], datetime], max_nodes: int = 256) -> None:
        if max_nodes < 1:
            raise ValueError("max_nodes must be at least 1")
        self._now, self._max = now, max_nodes
        self._entries: dict[str, list[RosterEntry]] = {}
        self._lock = threading.Lock()

    def add(self, key_id: str, certificate: str, not_after: datetime) -> None:
        """Remember a certificate just issued under `key_id`."""
        with self._lock:
            entries = self._live(key_id)
            entries.append(RosterEntry(certificate, not_after))
            entries.sort(key=lambda e: e.not_after)
            del entries[: max(0, len(entries) - self._max)]

    def certificates(self, key_id: str) -> list[str]:
        """The unexpired certificates issued under `key_id`, oldest expiry first."""
        with self._lock:
            return [entry.certificate for entry in self._live(key_id)]

    def _live(self, key_id: str) -> list[RosterEntry]:
        now = self._now()
        entries = [e for e in self._entries.get(key_id, []) if e.not_after > now]
        self._entries[key_id] = entries
        return entries
