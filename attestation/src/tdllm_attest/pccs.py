"""Collateral from a PCCS or Intel PCS (API v4, TDX), with an on-disk cache.

Endpoints, relative to the server's base URL (what `sgx_default_qcnl.conf` calls `pccs_url`,
without its `/sgx/certification/v4` suffix):

* `GET /tdx/certification/v4/tcb?fmspc=<hex>` -> `{"tcbInfo": {...}, "signature": "<hex r||s>"}`,
  issuer chain in header `TCB-Info-Issuer-Chain` (older servers: `SGX-TCB-Info-Issuer-Chain`);
* `GET /tdx/certification/v4/qe/identity` -> `{"enclaveIdentity": {...}, "signature": ...}`,
  issuer chain in header `SGX-Enclave-Identity-Issuer-Chain`;
* `GET /sgx/certification/v4/pckcrl?ca=platform|processor&encoding=der` -> the PCK CRL,
  issuer chain in header `SGX-PCK-CRL-Issuer-Chain`;
* `GET /sgx/certification/v4/rootcacrl` -> the root CA CRL (a PCCS endpoint; PCCS sends hex text).

Issuer chains are URL-encoded PEM. The signatures cover the exact bytes of the inner objects as
served, so those are cut out of the body, never re-serialised. Nothing fetched is trusted: the
result is the dcap-qvl JSON layout parsed by `collateral_from_json`, and `verify_quote` checks every
signature and chain exactly as for a collateral file. There is never a fallback to other
collateral: a failed or refused fetch is a `CollateralError`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import requests

from tdllm_attest import memo
from tdllm_attest.abi import parse_quote
from tdllm_attest.clock import require_aware
from tdllm_attest.collateral import (
    MAX_COLLATERAL_BYTES,
    QE_IDENTITY_ID_TD_QE,
    TCB_INFO_ID_TDX,
    Collateral,
    PckPlatform,
    collateral_from_json,
    pck_platform,
)
from tdllm_attest.errors import CollateralError
from tdllm_attest.pccs_wire import HEX, crl_der, issuer_chain_pem, signed_object_text

log = logging.getLogger(__name__)

TCB_INFO_CHAIN_HEADERS = ("TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain")
QE_IDENTITY_CHAIN_HEADERS = ("SGX-Enclave-Identity-Issuer-Chain",)
PCK_CRL_CHAIN_HEADERS = ("SGX-PCK-CRL-Issuer-Chain",)
API_SUFFIXES = ("/sgx/certification/v4", "/tdx/certification/v4")
# Intel PCS has no rootcacrl endpoint; there, pass the root certificate's CRL distribution point.
INTEL_ROOT_CA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
DEFAULT_TIMEOUT_S = 10.0
# Below a relying party's 24 h maximum collateral age (FreshnessLimits.max_age), so that cached
# collateral is refreshed while the freshest copy the PCCS has is still acceptable.
DEFAULT_REFRESH_AFTER = timedelta(hours=12)
DEFAULT_MIN_REFETCH_INTERVAL = timedelta(minutes=5)
_RETRY_STATUSES = frozenset({429})  # plus every 5xx
_FMSPC = re.compile(r"[0-9A-F]{12}")
_CHUNK = 64 * 1024


def system_clock() -> datetime:
    """The current time (UTC). The only clock read of this module, and only as a default."""
    return datetime.now(UTC)


def default_cache_dir() -> Path:
    """`~/.cache/tdllm/collateral`, the CLI's default cache directory."""
    return Path.home() / ".cache" / "tdllm" / "collateral"


def normalize_base_url(url: str) -> str:
    """The server's base URL: http(s), no trailing slash, no `/{sgx,tdx}/certification/v4`."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"{url!r} is not an http(s) base URL of a PCCS")
    base = url.strip().rstrip("/")
    for suffix in API_SUFFIXES:
        base = base.removesuffix(suffix)
    return base


# -- validity windows -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dated:
    what: str
    issued: datetime
    next_update: datetime
    counts_for_age: bool = True


def _crl_dates(der: bytes, what: str, *, counts_for_age: bool) -> _Dated:
    crl = memo.crl_from_der(der)
    next_update = crl.next_update_utc
    if next_update is None:
        raise CollateralError(f"{what} has no nextUpdate")
    return _Dated(what, crl.last_update_utc, next_update, counts_for_age)


def _dates(collateral: Collateral) -> list[_Dated]:
    tcb, qe = collateral.tcb_info, collateral.qe_identity
    return [
        _Dated("TCB Info", tcb.issue_date, tcb.next_update),
        _Dated("QE Identity", qe.issue_date, qe.next_update),
        _crl_dates(collateral.pck_crl, "PCK CRL", counts_for_age=True),
        # Intel re-issues the root CA CRL about yearly: its age says nothing about staleness
        # (FreshnessLimits skips it too); only its nextUpdate matters.
        _crl_dates(collateral.root_ca_crl, "root CA CRL", counts_for_age=False),
    ]


def not_current_reason(collateral: Collateral, now: datetime) -> str | None:
    """Why `collateral` is not current at `now` (a part issued later, or past nextUpdate)."""
    for d in _dates(collateral):
        if now < d.issued:
            return f"{d.what} is issued {d.issued.isoformat()}, after {now.isoformat()}"
        if now > d.next_update:
            return f"{d.what} is stale: nextUpdate {d.next_update.isoformat()} < {now.isoformat()}"
    return None


def cache_entry_usable(collateral: Collateral, now: datetime, refresh_after: timedelta) -> bool:
    """True while `now` < every nextUpdate and the oldest issue is younger than `refresh_after`."""
    dates = _dates(collateral)
    if any(not d.issued <= now < d.next_update for d in dates):
        return False
    oldest = min(d.issued for d in dates if d.counts_for_age)
    return now - oldest < refresh_after


# -- HTTP -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded tries on connection errors, 5xx and 429, with exponential backoff between them."""

    tries: int = 3
    backoff_s: float = 0.5
    sleep: Callable[[float], None] = time.sleep

    def delay(self, failed_tries: int) -> float:
        """Seconds to wait after `failed_tries` failures (0.5, 1, 2, ... by default)."""
        return self.backoff_s * float(2 ** (failed_tries - 1))


class _Transient(Exception):  # noqa: N818  # internal signal, not an error to report
    """A failure worth another try (connection, timeout, 5xx, 429, cut-off body)."""


def _root_cause(exc: BaseException) -> str:
    """A short reason from an exception chain (requests nests urllib3 nests socket errors)."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.append(cur)
        if isinstance(cur, OSError) and cur.strerror:
            return cur.strerror
        nested = [getattr(cur, "reason", None), cur.__cause__, cur.__context__, *cur.args]
        todo.extend(n for n in nested if isinstance(n, BaseException))
    text = " ".join(str(seen[-1]).split()) or type(seen[-1]).__name__
    return text[:200]


@dataclass(frozen=True)
class _Signed:
    text: str  # the inner object exactly as served: what the signature covers
    signature: str  # hex r||s
    issuer_chain: str  # PEM


@dataclass(frozen=True)
class _Response:
    url: str
    body: bytes
    headers: Mapping[str, str]

    def header(self, names: tuple[str, ...]) -> tuple[str, str]:
        for name in names:
            value = self.headers.get(name)
            if value is not None:
                return name, value
        raise CollateralError(f"PCCS {self.url}: response lacks the {names[0]} header")

    def text(self) -> str:
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError:
            raise CollateralError(f"PCCS {self.url}: body is not UTF-8 text") from None


@dataclass
class PccsClient:
    """Fetches TDX collateral for one platform from a PCCS or Intel PCS (API v4).

    `session` is injectable (tests count its requests; a PCCS with its own CA: set
    `session.verify`). `fetch` validates what it got (parse, FMSPC, ids, dates) before returning.
    """

    base_url: str
    session: requests.Session = field(default_factory=requests.Session)
    timeout_s: float = DEFAULT_TIMEOUT_S
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_bytes: int = MAX_COLLATERAL_BYTES
    root_ca_crl_url: str | None = None  # default: the PCCS's rootcacrl endpoint

    def __post_init__(self) -> None:
        self.base_url = normalize_base_url(self.base_url)
        if self.retry.tries < 1:
            raise ValueError("retry.tries must be at least 1")

    def close(self) -> None:
        """Close the HTTP session (its pooled connections)."""
        self.session.close()

    def url(self, tee: str, path: str) -> str:
        """Full URL of an API v4 endpoint (`tee` is "sgx" or "tdx")."""
        return f"{self.base_url}/{tee}/certification/v4/{path}"

    def fetch(self, platform: PckPlatform, now: datetime) -> Collateral:
        """Collateral for `platform`, checked to be for its FMSPC and current at `now`."""
        if not _FMSPC.fullmatch(platform.fmspc) or platform.ca not in ("platform", "processor"):
            raise CollateralError(f"cannot ask a PCCS for FMSPC {platform.fmspc!r} / {platform.ca}")
        layout = json.dumps(self._layout(platform))
        try:
            collateral = collateral_from_json(layout)
        except CollateralError as exc:
            raise CollateralError(f"PCCS {self.base_url}: {exc}") from None
        self._check(collateral, platform.fmspc, require_aware(now))
        return collateral

    def _layout(self, platform: PckPlatform) -> dict[str, str]:
        """The four documents, in dcap-qvl's JSON layout (signed texts exactly as served)."""
        fmspc = platform.fmspc
        tcb = self._signed(
            self.url("tdx", f"tcb?fmspc={fmspc}"),
            "tcbInfo",
            TCB_INFO_CHAIN_HEADERS,
            what=f"TCB Info for FMSPC {fmspc}",
        )
        qe = self._signed(
            self.url("tdx", "qe/identity"),
            "enclaveIdentity",
            QE_IDENTITY_CHAIN_HEADERS,
            what="TD QE Identity",
        )
        pck_crl, pck_chain = self._crl(
            self.url("sgx", f"pckcrl?ca={platform.ca}&encoding=der"),
            PCK_CRL_CHAIN_HEADERS,
            what=f"PCK CRL of the {platform.ca} CA",
        )
        root_url = self.root_ca_crl_url or self.url("sgx", "rootcacrl")
        root_crl, _ = self._crl(root_url, (), what="root CA CRL")
        return {
            "pck_crl_issuer_chain": pck_chain,
            "root_ca_crl": root_crl.hex(),
            "pck_crl": pck_crl.hex(),
            "tcb_info_issuer_chain": tcb.issuer_chain,
            "tcb_info": tcb.text,
            "tcb_info_signature": tcb.signature,
            "qe_identity_issuer_chain": qe.issuer_chain,
            "qe_identity": qe.text,
            "qe_identity_signature": qe.signature,
        }

    def _check(self, collateral: Collateral, fmspc: str, now: datetime) -> None:
        where = f"PCCS {self.base_url}"
        if collateral.fmspc != fmspc:
            raise CollateralError(
                f"{where}: TCB Info is for FMSPC {collateral.fmspc}, asked for {fmspc}"
            )
        if collateral.tcb_info.id != TCB_INFO_ID_TDX:
            raise CollateralError(f"{where}: TCB Info id is {collateral.tcb_info.id!r}, not TDX")
        if collateral.qe_identity.id != QE_IDENTITY_ID_TD_QE:
            raise CollateralError(f"{where}: QE Identity id is {collateral.qe_identity.id!r}")
        reason = not_current_reason(collateral, now)
        if reason is not None:
            raise CollateralError(f"{where}: collateral for FMSPC {fmspc} refused: {reason}")

    def _signed(self, url: str, key: str, chain_headers: tuple[str, ...], *, what: str) -> _Signed:
        response = self._get(url, what)
        try:
            text, signature = signed_object_text(response.text(), key)
        except ValueError as exc:
            raise CollateralError(f"PCCS {url}: truncated/invalid JSON ({exc})") from None
        if len(signature) != 128 or not HEX.fullmatch(signature.encode()):
            raise CollateralError(f"PCCS {url}: {what} signature is not 64 bytes of hex (r||s)")
        return _Signed(text, signature, self._chain(response, chain_headers))

    def _crl(self, url: str, chain_headers: tuple[str, ...], *, what: str) -> tuple[bytes, str]:
        """(CRL DER, issuer chain PEM or '' when no header is asked for)."""
        response = self._get(url, what)
        try:
            der = crl_der(response.body)
        except ValueError:
            raise CollateralError(f"PCCS {url}: {what} is not a CRL (DER, PEM or hex)") from None
        return der, self._chain(response, chain_headers) if chain_headers else ""

    @staticmethod
    def _chain(response: _Response, names: tuple[str, ...]) -> str:
        name, value = response.header(names)
        try:
            return issuer_chain_pem(value)
        except ValueError:
            raise CollateralError(
                f"PCCS {response.url}: header {name} is not a URL-encoded PEM certificate chain"
            ) from None

    def _get(self, url: str, what: str) -> _Response:
        reason = ""
        for attempt in range(1, self.retry.tries + 1):
            if attempt > 1:
                self.retry.sleep(self.retry.delay(attempt - 1))
            try:
                return self._get_once(url, what)
            except _Transient as exc:
                reason = str(exc)
                log.info("PCCS %s: try %d/%d failed: %s", url, attempt, self.retry.tries, reason)
        raise CollateralError(f"PCCS unreachable after {self.retry.tries} tries: {url}: {reason}")

    def _get_once(self, url: str, what: str) -> _Response:
        try:
            # identity encoding: the size limit then bounds what is held in memory
            response = self.session.get(
                url,
                timeout=self.timeout_s,
                stream=True,
                allow_redirects=False,
                headers={"Accept-Encoding": "identity"},
            )
        except requests.Timeout:
            raise _Transient(f"no answer within {self.timeout_s} s") from None
        except requests.RequestException as exc:
            raise _Transient(_root_cause(exc)) from None
        with response:
            status = response.status_code
            if status in _RETRY_STATUSES or status >= 500:
                raise _Transient(f"HTTP {status}")
            if status != 200:
                raise CollateralError(f"PCCS {url}: HTTP {status} for {what}")
            return _Response(url, self._read(response, url), response.headers)

    def _read(self, response: requests.Response, url: str) -> bytes:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise CollateralError(f"PCCS {url}: response of {declared} bytes exceeds the limit")
        body = bytearray()
        try:
            for chunk in response.iter_content(chunk_size=_CHUNK):
                body += chunk
                if len(body) > self.max_bytes:
                    raise CollateralError(f"PCCS {url}: response exceeds {self.max_bytes} bytes")
        except requests.RequestException as exc:
            raise _Transient(f"incomplete response ({_root_cause(exc)})") from None
        return bytes(body)


# -- cache and source -------------------------------------------------------------------------


@dataclass(frozen=True)
class CollateralCache:
    """One JSON file (dcap-qvl layout) per FMSPC and PCK CA; written atomically.

    Collateral is public, so files are world-readable. An unreadable or corrupt file counts as
    absent and is replaced by the next fetch; a failed write is logged, not an error.
    """

    directory: Path

    def path_for(self, platform: PckPlatform) -> Path:
        """The cache file of `platform` (FMSPC and CA are validated: no path tricks)."""
        if not _FMSPC.fullmatch(platform.fmspc) or platform.ca not in ("platform", "processor"):
            raise CollateralError(f"no cache key for FMSPC {platform.fmspc!r} / {platform.ca}")
        return self.directory / f"tdx-{platform.fmspc}-{platform.ca}.json"

    def load(self, platform: PckPlatform) -> Collateral | None:
        """The cached collateral of `platform`, or None when absent, unreadable or corrupt."""
        path = self.path_for(platform)
        try:
            if path.stat().st_size > MAX_COLLATERAL_BYTES:
                raise CollateralError("file too large")
            collateral = collateral_from_json(path.read_text(encoding="utf-8"))
            if collateral.fmspc != platform.fmspc:
                raise CollateralError(f"holds FMSPC {collateral.fmspc}")
            _dates(collateral)  # the CRLs must parse and carry a nextUpdate
        except FileNotFoundError:
            return None
        except (OSError, ValueError, CollateralError) as exc:  # UnicodeDecodeError is a ValueError
            log.warning("collateral cache %s ignored (will be replaced): %s", path, exc)
            return None
        return collateral

    def store(self, platform: PckPlatform, collateral: Collateral) -> None:
        """Write `collateral` for `platform`: temporary file in the same directory, then rename."""
        path = self.path_for(platform)
        tmp: str | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(collateral.source_json)
            os.chmod(tmp, 0o644)  # public data; mkstemp creates 0600
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("collateral cache %s not written: %s", path, exc)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


class MemoryCollateralCache:
    """The same interface in memory, for a process that must not write (the in-TD service)."""

    def __init__(self) -> None:
        self._entries: dict[PckPlatform, Collateral] = {}
        self._lock = threading.Lock()

    def load(self, platform: PckPlatform) -> Collateral | None:
        with self._lock:
            return self._entries.get(platform)

    def store(self, platform: PckPlatform, collateral: Collateral) -> None:
        with self._lock:
            self._entries[platform] = collateral


@dataclass(frozen=True)
class PccsCollateralSource:
    """A `CollateralSource`: cached collateral while usable, else a fresh fetch from the PCCS.

    A cache entry is used while `now` is before every nextUpdate (TCB Info, QE Identity, both
    CRLs) and its oldest issue (TCB Info / QE Identity issueDate, PCK CRL thisUpdate) is younger
    than `refresh_after`. `now` is injected; `system_clock` is only the default.
    """

    client: PccsClient
    cache: CollateralCache | MemoryCollateralCache | None = None
    now: Callable[[], datetime] = system_clock
    refresh_after: timedelta = DEFAULT_REFRESH_AFTER
    # A PCCS may itself hold collateral older than `refresh_after`; re-asking it on every call
    # would then cost a fetch per key release. Within this interval of our last fetch a still
    # current entry is reused (the verifier's max-age limit still judges it).
    min_refetch_interval: timedelta = DEFAULT_MIN_REFETCH_INTERVAL
    _fetched_at: dict[PckPlatform, datetime] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.refresh_after <= timedelta(0):
            raise ValueError("refresh_after must be positive")

    def get(self, raw_quote: bytes) -> Collateral:
        """Collateral for the platform (FMSPC, PCK CA) that produced `raw_quote`."""
        return self.collateral_for(pck_platform(parse_quote(raw_quote)))

    def collateral_for(self, platform: PckPlatform) -> Collateral:
        """Cached collateral for `platform` if still usable at `now`, else fetched and cached."""
        now = require_aware(self.now())
        if self.cache is not None:
            cached = self.cache.load(platform)
            if cached is not None and self._usable(platform, cached, now):
                return cached
        fetched = self.client.fetch(platform, now)
        self._fetched_at[platform] = now
        if self.cache is not None:
            self.cache.store(platform, fetched)
        return fetched

    def _usable(self, platform: PckPlatform, cached: Collateral, now: datetime) -> bool:
        if cache_entry_usable(cached, now, self.refresh_after):
            return True
        last = self._fetched_at.get(platform)
        recently = last is not None and timedelta(0) <= now - last < self.min_refetch_interval
        return recently and not_current_reason(cached, now) is None
