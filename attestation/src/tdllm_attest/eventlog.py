"""Event logs and RTMR replay: the firmware's CCEL (TCG2, SHA-384) and our runtime RTMR3 log.

Replay computes `RTMR = SHA-384(RTMR || digest)` from 48 zero bytes. A log that replays to the
quote's registers is honest about what was measured; judging the events is policy.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

from tdllm_attest.abi import RTMR_COUNT, RTMR_SIZE
from tdllm_attest.bytereader import ByteReader
from tdllm_attest.errors import EventLogError

CCEL_SIGNATURE = b"CCEL"
CCEL_TABLE_SIZE = 56
ACPI_HEADER_SIZE = 36
CC_TYPE_TDX = 2
TPM_ALG_SHA384 = 0x000C
SHA384_SIZE = 48
EV_NO_ACTION = 0x00000003
SPEC_ID_EVENT03 = b"Spec ID Event03\x00"
# CC event log MR index: 0 = MRTD, 1..4 = RTMR0..3.
CC_MR_INDEX_RTMR0 = 1
MAX_EVENTS = 100_000
MAX_EVENT_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True)
class CcelTable:
    """The ACPI CCEL table: where the firmware's confidential-computing event log lives."""

    cc_type: int
    cc_subtype: int
    log_area_minimum_length: int
    log_area_start_address: int


@dataclass(frozen=True)
class Event:
    """One measured event: the RTMR it extends (0..3), its type, SHA-384 digest and data."""

    rtmr_index: int
    event_type: int
    digest: bytes
    data: bytes


def parse_ccel_table(data: bytes) -> CcelTable:
    """Parse and check the 56-byte ACPI CCEL table (signature, length, checksum, TDX type)."""
    if len(data) != CCEL_TABLE_SIZE:
        raise EventLogError(f"CCEL table is {len(data)} bytes, want {CCEL_TABLE_SIZE}")
    if data[:4] != CCEL_SIGNATURE:
        raise EventLogError("CCEL table signature is not 'CCEL'")
    (length,) = struct.unpack_from("<I", data, 4)
    if length != CCEL_TABLE_SIZE:
        raise EventLogError(f"CCEL table declares length {length}, want {CCEL_TABLE_SIZE}")
    if sum(data) % 256 != 0:
        raise EventLogError("CCEL table checksum is wrong")
    cc_type, cc_subtype = data[ACPI_HEADER_SIZE], data[ACPI_HEADER_SIZE + 1]
    if cc_type != CC_TYPE_TDX:
        raise EventLogError(f"CCEL CC type {cc_type} is not TDX ({CC_TYPE_TDX})")
    laml, lasa = struct.unpack_from("<QQ", data, ACPI_HEADER_SIZE + 4)
    return CcelTable(cc_type, cc_subtype, laml, lasa)


def _parse_spec_id(event: bytes) -> dict[int, int]:
    if not event.startswith(SPEC_ID_EVENT03):
        raise EventLogError("first event is not a TCG 'Spec ID Event03'")
    c = ByteReader(event, error=EventLogError, subject="event log")
    c.take(len(SPEC_ID_EVENT03) + 4 + 4, "Spec ID header")  # signature, platformClass, versions
    count = c.u32("algorithm count")
    if count == 0 or count > 16:
        raise EventLogError(f"Spec ID event lists {count} algorithms")
    sizes = {}
    for _ in range(count):
        alg = c.u16("algorithm id")
        sizes[alg] = c.u16("digest size")
    if sizes.get(TPM_ALG_SHA384) != SHA384_SIZE:
        raise EventLogError("event log does not carry SHA-384 digests")
    return sizes


def parse_ccel_log(data: bytes) -> list[Event]:
    """Parse a TCG2 crypto-agile event log (CCEL log area); trailing 0x00/0xFF padding ends it."""
    c = ByteReader(data, error=EventLogError, subject="event log")
    # First event: legacy TCG_PCClientPCREvent with a SHA-1 slot, carrying the Spec ID event.
    c.u32("first event MR index")
    if c.u32("first event type") != EV_NO_ACTION:
        raise EventLogError("first event is not EV_NO_ACTION")
    c.take(20, "first event SHA-1 digest")
    sizes = _parse_spec_id(c.take(c.u32("first event size"), "Spec ID event"))
    events: list[Event] = []
    while c.pos + 8 <= len(data) and len(events) < MAX_EVENTS:
        mr_index, event_type = struct.unpack_from("<II", data, c.pos)
        if (mr_index, event_type) in ((0xFFFFFFFF, 0xFFFFFFFF), (0, 0)):
            break  # end of the used log area
        c.pos += 8
        digest_count = c.u32("digest count")
        if digest_count == 0 or digest_count > len(sizes):
            raise EventLogError(f"event {len(events)} has {digest_count} digests")
        sha384: bytes | None = None
        for _ in range(digest_count):
            alg = c.u16("digest algorithm")
            if alg not in sizes:
                raise EventLogError(f"event {len(events)} uses undeclared algorithm {alg:#x}")
            digest = c.take(sizes[alg], "digest")
            if alg == TPM_ALG_SHA384:
                sha384 = digest
        size = c.u32("event size")
        if size > MAX_EVENT_SIZE:
            raise EventLogError(f"event {len(events)} declares {size} bytes")
        payload = c.take(size, "event data")
        if sha384 is None:
            raise EventLogError(f"event {len(events)} has no SHA-384 digest")
        if event_type == EV_NO_ACTION:
            continue  # informational, never extended
        if not CC_MR_INDEX_RTMR0 <= mr_index < CC_MR_INDEX_RTMR0 + RTMR_COUNT:
            raise EventLogError(f"event {len(events)} has MR index {mr_index}, not an RTMR")
        events.append(Event(mr_index - CC_MR_INDEX_RTMR0, event_type, sha384, payload))
    return events


def replay(events: list[Event]) -> tuple[bytes, bytes, bytes, bytes]:
    """Replay events into RTMR0..3, each starting at 48 zero bytes."""
    regs = [bytes(RTMR_SIZE)] * RTMR_COUNT
    for ev in events:
        if len(ev.digest) != SHA384_SIZE or not 0 <= ev.rtmr_index < RTMR_COUNT:
            raise EventLogError("event with a bad digest size or RTMR index")
        regs[ev.rtmr_index] = hashlib.sha384(regs[ev.rtmr_index] + ev.digest).digest()
    return regs[0], regs[1], regs[2], regs[3]


def parse_runtime_log(text: str) -> list[Event]:
    """Parse our runtime RTMR3 log: JSON `{"events": [{"digest": hex, "description": str}]}`.

    Each digest is the 48 bytes that were extended into RTMR3 (sysfs adds no CCEL entry for
    runtime extends, so the extender keeps this log itself).
    """
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can parse
        raise EventLogError("runtime event log is not JSON") from None
    items = doc.get("events") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise EventLogError("runtime event log lacks an 'events' list")
    events = []
    for i, item in enumerate(items):
        digest_hex = item.get("digest") if isinstance(item, dict) else None
        try:
            digest = bytes.fromhex(digest_hex) if isinstance(digest_hex, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != SHA384_SIZE:
            raise EventLogError(f"runtime event {i} lacks a 48-byte hex digest")
        description = str(item.get("description", ""))
        try:
            data = description.encode()
        except UnicodeEncodeError:  # a lone surrogate, from a \ud800 escape in the JSON
            raise EventLogError(f"runtime event {i} has a description that is not text") from None
        events.append(Event(3, 0, digest, data))
    return events
