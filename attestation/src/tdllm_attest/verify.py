"""Is the quote genuine? Strict framing, collateral checks, a `cryptography` cross-check, dcap-qvl.

`verify_quote` answers only "was this produced by a genuine, TCB-evaluated TDX platform?". It
returns the TCB status instead of judging it (dcap-qvl would accept OutOfDate); `policy` decides
about the status and about the measurements. The trust anchor and `now` are always explicit, so a
simulated mode can pass a test anchor and tests can pin the time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import dcap_qvl  # type: ignore[import-untyped]  # ships a .pyi but no py.typed marker

from tdllm_attest import crosscheck, memo
from tdllm_attest.abi import Quote, TdReport15, parse_quote
from tdllm_attest.clock import require_aware, unix_seconds
from tdllm_attest.collateral import (
    Collateral,
    CollateralSource,
    FreshnessLimits,
    check_collateral,
    pck_fmspc,
)
from tdllm_attest.errors import (
    AttestationError,
    ChainError,
    CollateralError,
    PolicyMismatch,
    QuoteParseError,
    SignatureError,
    TcbStatusError,
)
from tdllm_attest.errors import Mismatch as _Mismatch
from tdllm_attest.trust import TrustAnchor

TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)


@dataclass(frozen=True)
class CheckResult:
    """One named check of the verification, for reports and the CLI."""

    name: str
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class VerifiedQuote:
    """A quote whose signatures, chain and collateral verified; TCB status not yet judged."""

    quote: Quote
    tcb_status: str
    advisory_ids: tuple[str, ...]
    platform_tcb_status: str
    qe_tcb_status: str
    tcb_evaluation_data_number: int
    tcb_date: str | None
    fmspc: str
    anchor_sha256: str
    verified_at: datetime
    checks: tuple[CheckResult, ...]
    simulated: bool = False  # True when the anchor is not Intel's (a simulated-TD test root)


class VerificationProgress:
    """Collects the checks passed so far; callers (the CLI) print them even when one fails."""

    def __init__(self) -> None:
        self.checks: list[CheckResult] = []

    def run(self, name: str, check: Callable[[], object]) -> None:
        """Run `check`; a string it returns (how it passed, e.g. within a grace) is the detail."""
        try:
            outcome = check()
        except AttestationError as exc:
            self.checks.append(CheckResult(name, False, str(exc)))
            raise
        self.checks.append(CheckResult(name, True, outcome if isinstance(outcome, str) else ""))


# dcap-qvl reports every failure as ValueError with a message; map messages to our classes.
# The QE report must match the QE Identity (MRSIGNER, ISVPRODID, attributes, MISCSELECT): a
# mismatch means the quote did not come from Intel's TD QE, so it is a signature-class failure
# (evidence not genuine), not a TD policy one; a QE ISVSVN below the levels is a TCB failure.
_DCAP_CLASSES: tuple[tuple[tuple[str, ...], type[AttestationError]], ...] = (
    (("qe mrsigner", "qe isvprodid", "qe attributes", "qe miscselect"), SignatureError),
    (("tcb level", "tcb status", "isvsvn", "tcb info", "tdx module"), TcbStatusError),
    (("expired", "crl", "collateral", "not yet valid", "issue"), CollateralError),
    (("debug", "sept_ve", "attribute", "mrservicetd", "service td"), PolicyMismatch),
    (("certificate", "chain", "issuer"), ChainError),
    (("parse", "decode", "length"), QuoteParseError),
)


def _classify_dcap_error(message: str) -> AttestationError:
    lowered = message.lower()
    for needles, cls in _DCAP_CLASSES:
        if any(n in lowered for n in needles):
            if cls is PolicyMismatch:
                return PolicyMismatch([_Mismatch("td_attributes", message, "dcap-qvl TD checks")])
            return cls(f"dcap-qvl: {message}")
    return SignatureError(f"dcap-qvl: {message}")


_dcap_collaterals: memo.BoundedCache[str, Any] = memo.BoundedCache(maxsize=32)


def _dcap_collateral(collateral: Collateral) -> Any:
    text = collateral.source_json
    try:
        return _dcap_collaterals.get_or_compute(
            text, lambda: dcap_qvl.QuoteCollateralV3.from_json(text)
        )
    except ValueError as exc:
        raise CollateralError(f"dcap-qvl refuses the collateral: {exc}") from None


def _compare_parsers(quote: Quote, dcap_report: dict[str, Any]) -> None:
    """Our parser and dcap-qvl's must read the same body (differential defence)."""
    (kind, fields), *_ = dcap_report.items()
    ours = quote.td_report
    expected_kind = "TD15" if isinstance(ours, TdReport15) else "TD10"
    regs = ours.registers()
    for i in range(4):
        regs[f"rt_mr{i}"] = regs.pop(f"rtmr{i}")
    diffs = [k for k, v in regs.items() if k in fields and fields[k] != v.hex()]
    if kind != expected_kind or diffs:
        raise QuoteParseError(f"parsers disagree on the TD report ({kind}, fields {diffs})")


def _run_dcap(
    quote: Quote, collateral: Collateral, anchor: TrustAnchor, now: datetime
) -> dict[str, Any]:
    secs = unix_seconds(now)
    try:
        claims = dcap_qvl.QuoteVerifier(anchor.der).verify_with_policy(
            quote.raw, _dcap_collateral(collateral), secs, dcap_qvl.QuotePolicy.claims_only(secs)
        )
        return cast(dict[str, Any], json.loads(claims.to_json()))
    except ValueError as exc:
        raise _classify_dcap_error(str(exc)) from None


def verify_quote(
    raw_quote: bytes,
    collateral: Collateral | CollateralSource,
    *,
    now: datetime,
    anchor: TrustAnchor,
    limits: FreshnessLimits | None = None,
    progress: VerificationProgress | None = None,
) -> VerifiedQuote:
    """Verify a TDX quote against `collateral` and `anchor` at time `now`.

    Raises a subclass of `AttestationError` (parse, signature/chain, collateral, TCB) on the first
    failed check. The TCB status is returned, not judged: call `policy.check_tcb` next.
    """
    now = require_aware(now)
    progress = progress or VerificationProgress()
    holder: dict[str, Any] = {}

    def parse() -> None:
        holder["quote"] = parse_quote(raw_quote)

    progress.run("quote framing", parse)
    quote: Quote = holder["quote"]

    def embedded_root() -> None:
        if quote.signature_data.pck_chain.root_der != anchor.der:
            raise ChainError("root certificate embedded in the quote is not the trust anchor")

    progress.run("embedded root is the trust anchor", embedded_root)

    def load() -> None:
        holder["collateral"] = (
            collateral if isinstance(collateral, Collateral) else collateral.get(quote.raw)
        )
        holder["fmspc"] = pck_fmspc(quote)

    progress.run("collateral available", load)
    col: Collateral = holder["collateral"]
    fmspc: str = holder["fmspc"]
    pck_ca = crosscheck.pck_certificates(quote)[1]
    progress.run(
        "collateral signatures and freshness",
        lambda: check_collateral(
            col, pck_ca=pck_ca, fmspc=fmspc, anchor=anchor, now=now, limits=limits
        ),
    )
    progress.run(
        "PCK chain to the trust anchor, not revoked",
        lambda: crosscheck.check_pck_chain(quote, anchor, now, col),
    )
    progress.run(
        "QE report signed by the PCK leaf", lambda: crosscheck.check_qe_report_signature(quote)
    )
    progress.run("QE report binds the attestation key", lambda: crosscheck.check_qe_binding(quote))
    progress.run(
        "quote signed by the attestation key", lambda: crosscheck.check_quote_signature(quote)
    )

    def dcap() -> None:
        holder["claims"] = _run_dcap(quote, col, anchor, now)
        _compare_parsers(quote, holder["claims"]["report"])

    progress.run("dcap-qvl verification (TCB evaluation)", dcap)
    claims: dict[str, Any] = holder["claims"]
    tcb = claims["tcb"]
    return VerifiedQuote(
        quote=quote,
        tcb_status=str(tcb["status"]),
        advisory_ids=tuple(str(a) for a in tcb["advisory_ids"]),
        platform_tcb_status=str(claims["platform"]["tcb_level"]["tcbStatus"]),
        qe_tcb_status=str(claims["qe"]["tcb_level"]["tcbStatus"]),
        tcb_evaluation_data_number=int(tcb["eval_data_number"]),
        tcb_date=claims["platform"]["tcb_level"].get("tcbDate"),
        fmspc=fmspc,
        anchor_sha256=anchor.sha256,
        verified_at=now,
        checks=tuple(progress.checks),
        simulated=not anchor.is_intel,
    )
