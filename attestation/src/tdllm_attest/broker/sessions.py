"""Single-use, short-lived challenge sessions. Time comes from an injected clock."""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from tdllm_attest.broker.problems import InvalidSession
from tdllm_attest.broker.protocol import NONCE_SIZE, SESSION_ID_SIZE
from tdllm_attest.wire import b64url


@dataclass(frozen=True)
class Session:
    """One challenge: what the TD must bind, and until when."""

    session_id: str
    nonce: str
    key_id: str
    expires_at: datetime


class SessionStore:
    """In-memory sessions; `take` hands a session out at most once (then it is gone).

    At most `max_sessions` live at once. Sessions are kept in the order they were opened, which
    is also the order they expire in, so expired ones are purged from the front on each `open`
    and, when the table is still full, the oldest pending session is evicted. A challenge flood
    can thus make a legitimate client's pending session disappear: its attest then fails closed
    (`invalid-session`, nothing released) and it retries with a fresh challenge, which the flood
    cannot refuse. Refusing new sessions instead would let the same flood lock out every client.
    """

    def __init__(
        self, now: Callable[[], datetime], ttl: timedelta, max_sessions: int = 10_000
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self._now = now
        self._ttl = ttl
        self._max = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def open(self, key_id: str) -> Session:
        """Start a session for `key_id` with a fresh 128-bit id and 32-byte nonce."""
        now = self._now()
        session = Session(
            session_id=b64url(secrets.token_bytes(SESSION_ID_SIZE)),
            nonce=b64url(secrets.token_bytes(NONCE_SIZE)),
            key_id=key_id,
            expires_at=now + self._ttl,
        )
        with self._lock:
            self._drop_expired(now)
            while len(self._sessions) >= self._max:
                self._sessions.popitem(last=False)
            self._sessions[session.session_id] = session
        return session

    def _drop_expired(self, now: datetime) -> None:
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if oldest.expires_at >= now:
                return
            self._sessions.popitem(last=False)

    def take(self, session_id: str) -> Session:
        """Remove and return the session: used or not, it can never be presented again."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise InvalidSession("unknown, already used or burned session")
        now = self._now()
        if now > session.expires_at:
            raise InvalidSession(
                f"session expired at {session.expires_at.isoformat()} (now {now.isoformat()})"
            )
        return session
