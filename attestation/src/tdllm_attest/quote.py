"""Guest side: get a TDX quote over 64 bytes of REPORTDATA.

`ConfigfsTsmProvider` follows the Linux configfs-tsm report ABI (Documentation/ABI/testing/
configfs-tsm-report): mkdir a private entry, check `provider` is `tdx_guest`, write exactly 64
bytes to `inblob`, read `outblob`, check `generation` advanced by exactly our one write (else a
concurrent writer raced us: retry), retry EBUSY with bounded back-off, and always rmdir.

The UNSAFE `SimulatedProvider` lives in `tdllm_attest.testing.provider`, which this module never
imports: there is no fallback between the two, a configfs failure is an error, never a simulated
quote.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tdllm_attest.abi import MAX_QUOTE_BUFFER_SIZE, REPORT_DATA_SIZE
from tdllm_attest.errors import AttestationError

log = logging.getLogger(__name__)

CONFIGFS_TSM_REPORT = Path("/sys/kernel/config/tsm/report")
TDX_PROVIDER = "tdx_guest"


class QuoteProviderError(AttestationError):
    """No quote could be obtained (wrong provider, kernel busy too long, empty outblob...)."""


class QuoteProvider(Protocol):
    """Anything that turns 64 bytes of REPORTDATA into a TDX quote."""

    def get_quote(self, report_data: bytes) -> bytes:
        """Return a quote whose TD report carries exactly `report_data` (64 bytes)."""
        ...


def _check_report_data(report_data: bytes) -> None:
    if len(report_data) != REPORT_DATA_SIZE:
        raise QuoteProviderError(
            f"report data must be exactly {REPORT_DATA_SIZE} bytes, got {len(report_data)}"
        )


class ConfigfsOps:
    """The file operations the provider makes; tests substitute a fake kernel around tmp_path."""

    def mkdir(self, path: Path) -> None:
        """Create a report entry (the kernel populates it)."""
        path.mkdir()

    def read(self, path: Path) -> bytes:
        """Read a whole attribute (outblob triggers quote generation in the kernel)."""
        with path.open("rb", buffering=0) as f:
            return f.read(MAX_QUOTE_BUFFER_SIZE + 1)

    def write(self, path: Path, data: bytes) -> None:
        """Write an attribute in one write(2) call."""
        with path.open("wb", buffering=0) as f:
            written = f.write(data)
        if written != len(data):
            raise QuoteProviderError(f"short write to {path.name} ({written} bytes)")

    def rmdir(self, path: Path) -> None:
        """Remove the report entry."""
        path.rmdir()


class _GenerationRaced(Exception):  # noqa: N818  # internal retry signal, never escapes
    """Someone else wrote to our entry between our write and our read."""


@dataclass
class ConfigfsTsmProvider:
    """Quotes through configfs-tsm. `root`, `sleep` and `ops` are injectable for tests.

    `attempts` bounds both EBUSY retries and generation-race retries; back-off doubles from
    `backoff_s`.
    """

    root: Path = CONFIGFS_TSM_REPORT
    attempts: int = 5
    backoff_s: float = 0.05
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    ops: ConfigfsOps = field(default_factory=ConfigfsOps, repr=False)

    def get_quote(self, report_data: bytes) -> bytes:
        _check_report_data(report_data)
        delay = self.backoff_s
        last = "no attempt made"
        for attempt in range(1, self.attempts + 1):
            try:
                return self._one_request(report_data)
            except _GenerationRaced as exc:
                last = str(exc)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise QuoteProviderError(f"configfs-tsm request failed: {exc}") from None
                last = "EBUSY (a previous quote request is still in flight)"
            log.info("configfs-tsm attempt %d/%d: %s; retrying", attempt, self.attempts, last)
            if attempt < self.attempts:
                self.sleep(delay)
                delay *= 2
        raise QuoteProviderError(f"configfs-tsm gave no quote after {self.attempts} tries: {last}")

    def _one_request(self, report_data: bytes) -> bytes:
        entry = self.root / f"tdllm-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            self.ops.mkdir(entry)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise
            raise QuoteProviderError(
                f"cannot create a configfs-tsm report entry under {self.root}: {exc}"
            ) from None
        try:
            provider = self.ops.read(entry / "provider").decode(errors="replace").strip()
            if provider != TDX_PROVIDER:
                raise QuoteProviderError(
                    f"configfs-tsm provider is {provider!r}, not {TDX_PROVIDER!r}: not a TDX guest"
                )
            before = self._generation(entry)
            self.ops.write(entry / "inblob", report_data)
            quote = self.ops.read(entry / "outblob")
            after = self._generation(entry)
            if after != before + 1:
                raise _GenerationRaced(
                    f"generation went {before} -> {after}, want +1 (concurrent writer)"
                )
            if not quote:
                raise QuoteProviderError("configfs-tsm returned an empty outblob")
            if len(quote) > MAX_QUOTE_BUFFER_SIZE:
                raise QuoteProviderError("configfs-tsm outblob exceeds the 32 KiB quote limit")
            return quote
        finally:
            try:
                self.ops.rmdir(entry)
            except OSError as exc:
                log.warning("could not remove configfs-tsm entry %s: %s", entry, exc)

    def _generation(self, entry: Path) -> int:
        text = self.ops.read(entry / "generation").decode(errors="replace").strip()
        try:
            return int(text)
        except ValueError:
            raise QuoteProviderError(f"configfs-tsm generation {text!r} is not a number") from None
