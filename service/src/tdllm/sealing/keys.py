"""Best-effort wiping of key material held in Python memory.

Keys live in `bytearray`s so they can be zeroed in place once used. This is best effort only:
CPython may have copied a key into an immutable `bytes` along the way (os.urandom, HKDF output,
the JWE payload inside jwcrypto), OpenSSL keeps its own expanded key schedule inside each AESGCM
object until it is freed, and the garbage collector decides when that happens. Inside a TD the
whole address space is encrypted and integrity-protected by the CPU, which is the real guard;
wiping only shortens how long a key sits in memory that a later bug could leak.
"""

from __future__ import annotations


def wipe(*buffers: bytearray) -> None:
    """Overwrite each buffer with zeros, in place."""
    for buffer in buffers:
        buffer[:] = bytes(len(buffer))
