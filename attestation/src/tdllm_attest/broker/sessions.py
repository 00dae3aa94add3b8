"""Single-use, short-lived challenge sessions. Time comes from an injected clock."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from tdllm_attest.broker.problems import InvalidSession
from tdllm_attest.broker.protocol import NONCE_SIZE, SESSION_ID_SIZE, b64url


@dataclass(frozen=True)
class Session:
    """One challenge: what the TD must bind, and until when."""

    session_id: str
    nonce: str
    key_id: str
    expires_at: datetime


class SessionStore:
    """In-memory sessions; `take` hands a session out at most once (then it is gone).

    Expired sessions are purged on each `open`; `max_sessions` bounds memory.
    """

    def __init__(
        self, now: Callable[[], datetime], ttl: timedelta, max_sessions: int = 10_000
    ) -> None:
        self._now = now
        self._ttl = ttl
        self._max = max_sessions
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

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
            for sid in [s for s, v in self._sessions.items() if v.expires_at < now]:
                del self._sessions[sid]
            if len(self._sessions) >= self._max:
                raise InvalidSession(f"session table full ({self._max}); refusing new sessions")
            self._sessions[session.session_id] = session
        return session

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
