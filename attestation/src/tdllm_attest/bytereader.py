"""A bounds-checked little-endian cursor shared by the quote and event-log parsers.

Every read past the end raises the caller's own typed error, so parsing arbitrary bytes can only
fail in the way its module documents.
"""

from __future__ import annotations

import struct

from tdllm_attest.errors import AttestationError


class ByteReader:
    def __init__(
        self,
        data: bytes,
        offset: int = 0,
        end: int | None = None,
        *,
        error: type[AttestationError],
        subject: str,
    ) -> None:
        self.data = data
        self.pos = offset
        self.end = len(data) if end is None else end
        self.error = error
        self.subject = subject  # "quote", "event log": names what was truncated

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.pos + size > self.end:
            raise self.error(
                f"{self.subject} truncated: {what} needs {size} bytes at offset {self.pos:#x}, "
                f"only {max(self.end - self.pos, 0)} left"
            )
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        value: int = struct.unpack("<H", self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.take(4, what))[0]
        return value
