"""Is the quote what we expect? A verified quote judged against a parsed reference-values policy.

`check_tcb` judges the TCB status that `verify` returned; `validate` compares the TD report with
the reference values and reports every mismatch at once; `check_model_release` says whether a key
for a model may go out. The policy document itself (parse, sign, verify the envelope) is
`tdllm_attest.policy_format`.
"""

from __future__ import annotations

import hmac
from datetime import datetime

from tdllm_attest.abi import RTMR_SIZE, TD_ATTRIBUTES_RESERVED_MASK, TdReport10, TdReport15
from tdllm_attest.errors import Mismatch, PolicyMismatch, TcbStatusError
from tdllm_attest.eventlog import Event, replay
from tdllm_attest.policy_format import (
    RTMR3_EVENT_LOG,
    MeasurementTuple,
    Policy,
    TcbPolicy,
)
from tdllm_attest.verify import VerifiedQuote

STATUS_REVOKED = "Revoked"
OUT_OF_DATE_STATUSES = frozenset({"OutOfDate", "OutOfDateConfigurationNeeded"})


def check_model_release(policy: Policy, model: str, version: int) -> None:
    """Raise `PolicyMismatch` unless the policy lets a key for `model` at `version` go out.

    A policy without `models` allows every model; an empty list allows none.
    """
    if policy.models is None:
        return
    rule = next((r for r in policy.models if r.model == model), None)
    if rule is None:
        allowed = ", ".join(repr(r.model) for r in policy.models) or "none"
        raise PolicyMismatch([Mismatch("model", repr(model), f"one of {allowed}")])
    if version < rule.min_version:
        raise PolicyMismatch(
            [
                Mismatch(
                    "model_version",
                    f"{model!r} version {version}",
                    f"at least version {rule.min_version} (older versions are rollbacks)",
                )
            ]
        )


def _grace_until(verified: VerifiedQuote, tcb: TcbPolicy) -> datetime | None:
    """End of the TCB-recovery grace for this quote, or None when it does not apply."""
    if verified.tcb_status not in OUT_OF_DATE_STATUSES or tcb.out_of_date_grace is None:
        return None
    if verified.tcb_date is None:
        raise TcbStatusError("OutOfDate TCB level carries no tcbDate: no grace can apply")
    try:
        tcb_date = datetime.fromisoformat(verified.tcb_date)
    except ValueError:
        raise TcbStatusError(f"TCB level date {verified.tcb_date!r} is not ISO 8601") from None
    if tcb_date.tzinfo is None:
        raise TcbStatusError(f"TCB level date {verified.tcb_date!r} has no time zone")
    return tcb_date + tcb.out_of_date_grace


def check_tcb(verified: VerifiedQuote, tcb: TcbPolicy | None = None) -> str:
    """Judge the TCB status and advisories; Revoked is never accepted.

    Returns how the status was accepted (for per-check reports); raises `TcbStatusError`.
    """
    tcb = tcb or TcbPolicy()
    status = verified.tcb_status
    grace_until = None if status in tcb.accepted_statuses else _grace_until(verified, tcb)
    in_grace = grace_until is not None and verified.verified_at <= grace_until
    if status == STATUS_REVOKED or (status not in tcb.accepted_statuses and not in_grace):
        expired = f"; TCB-recovery grace ended {grace_until.isoformat()}" if grace_until else ""
        raise TcbStatusError(
            f"TCB status {status} is not accepted (accepted: "
            f"{', '.join(sorted(tcb.accepted_statuses - {STATUS_REVOKED})) or 'none'}){expired}"
        )
    refused = [a for a in verified.advisory_ids if a not in tcb.allowed_advisories]
    if refused and not in_grace:
        raise TcbStatusError(f"advisories not on the allow-list: {', '.join(refused)}")
    minimum = tcb.min_tcb_evaluation_data_number
    if minimum is not None and verified.tcb_evaluation_data_number < minimum:
        raise TcbStatusError(
            f"TCB evaluation data number {verified.tcb_evaluation_data_number} is below {minimum}"
        )
    if in_grace and grace_until is not None:
        return (
            f"{status} accepted within the TCB-recovery grace (tcbDate {verified.tcb_date}, "
            f"until {grace_until.isoformat()}; advisories {', '.join(refused) or 'none'})"
        )
    return f"{status} accepted"


def td_baseline_mismatches(report: TdReport10, *, allow_service_td: bool = False) -> list[Mismatch]:
    """Checks every production TD must pass, with or without reference values."""
    out = []
    if report.debug:
        out.append(Mismatch("td_attributes.debug", "1", "0"))
    if not report.sept_ve_disable:
        out.append(Mismatch("td_attributes.sept_ve_disable", "0", "1"))
    reserved = report.td_attributes_value & TD_ATTRIBUTES_RESERVED_MASK
    if reserved:
        out.append(Mismatch("td_attributes.reserved", f"{reserved:#x}", "0"))
    if any(report.mr_signer_seam):
        out.append(Mismatch("mr_signer_seam", report.mr_signer_seam.hex(), "zero (Intel module)"))
    if isinstance(report, TdReport15) and any(report.mr_service_td) and not allow_service_td:
        out.append(Mismatch("mr_service_td", report.mr_service_td.hex(), "zero"))
    return out


def check_td_baseline(verified: VerifiedQuote) -> None:
    """Raise `PolicyMismatch` if the baseline TD checks fail (used when no policy is given)."""
    mismatches = td_baseline_mismatches(verified.quote.td_report)
    if mismatches:
        raise PolicyMismatch(mismatches)


def _eq(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _tuple_mismatches(report: TdReport10, allowed: tuple[MeasurementTuple, ...]) -> list[Mismatch]:
    found = (report.mr_td, report.rtmr[0], report.rtmr[1], report.rtmr[2])
    names = ("mr_td", "rtmr0", "rtmr1", "rtmr2")
    for t in allowed:
        if all(_eq(f, e) for f, e in zip(found, (t.mr_td, t.rtmr0, t.rtmr1, t.rtmr2), strict=True)):
            return []

    # Report per register against the closest tuple, so the message names what differs.
    def distance(t: MeasurementTuple) -> int:
        want = (t.mr_td, t.rtmr0, t.rtmr1, t.rtmr2)
        return sum(not _eq(f, e) for f, e in zip(found, want, strict=True))

    best = min(allowed, key=distance)
    want = (best.mr_td, best.rtmr0, best.rtmr1, best.rtmr2)
    out = [
        Mismatch(n, f.hex(), f"{e.hex()} (tuple {best.name!r})")
        for n, f, e in zip(names, found, want, strict=True)
        if not _eq(f, e)
    ]
    if not out:  # unreachable: a zero-distance tuple would have matched above
        out.append(Mismatch("measurements", "no allowed tuple", "one allowed tuple"))
    if len(allowed) > 1:
        out.append(
            Mismatch(
                "measurements",
                "(mr_td, rtmr0, rtmr1, rtmr2) matches no allowed tuple",
                f"one of {', '.join(repr(t.name) for t in allowed)}",
            )
        )
    return out


def validate(
    verified: VerifiedQuote,
    policy: Policy,
    *,
    ccel_events: list[Event] | None = None,
    runtime_events: list[Event] | None = None,
) -> None:
    """Compare the TD report with the policy; raise `PolicyMismatch` listing every difference.

    `ccel_events`, when given, must replay to RTMR0..2 of the quote. RTMR3 is checked as the
    policy says: zero, an exact value, or the replay of `runtime_events`.
    """
    report = verified.quote.td_report
    out = td_baseline_mismatches(report, allow_service_td=policy.allow_service_td)
    if report.xfam not in policy.xfam:
        allowed = ", ".join(sorted(x.hex() for x in policy.xfam)) or "none"
        out.append(Mismatch("xfam", report.xfam.hex(), f"one of {allowed}"))
    if policy.mr_seam and report.mr_seam not in policy.mr_seam:
        out.append(Mismatch("mr_seam", report.mr_seam.hex(), "an allow-listed TDX module"))
    out += _tuple_mismatches(report, policy.measurements)
    for name, found, want in (
        ("mr_config_id", report.mr_config_id, policy.mr_config_id),
        ("mr_owner", report.mr_owner, policy.mr_owner),
        ("mr_owner_config", report.mr_owner_config, policy.mr_owner_config),
    ):
        if not _eq(found, want):
            out.append(Mismatch(name, found.hex(), want.hex()))
    out += _rtmr3_mismatches(report, policy, runtime_events)
    if ccel_events is not None:
        replayed = replay(ccel_events)
        for i in range(3):
            if not _eq(replayed[i], report.rtmr[i]):
                out.append(
                    Mismatch(f"rtmr{i}", report.rtmr[i].hex(), f"{replayed[i].hex()} (CCEL replay)")
                )
    if out:
        raise PolicyMismatch(out)


def _rtmr3_mismatches(
    report: TdReport10, policy: Policy, runtime_events: list[Event] | None
) -> list[Mismatch]:
    found = report.rtmr[3]
    out: list[Mismatch] = []
    if isinstance(policy.rtmr3, bytes):
        want, label = policy.rtmr3, "policy value"
    elif policy.rtmr3 == RTMR3_EVENT_LOG:
        if runtime_events is None:
            return [Mismatch("rtmr3", found.hex(), "a runtime event log to replay (none given)")]
        want, label = replay(runtime_events)[3], "runtime event log replay"
        allowed = policy.rtmr3_allowed_events
        if allowed is not None:
            bad = [e.digest.hex() for e in runtime_events if e.digest not in allowed]
            if bad:
                out.append(Mismatch("rtmr3.events", ", ".join(bad), "allow-listed event digests"))
    else:
        want, label = bytes(RTMR_SIZE), "zero"
    if not _eq(found, want):
        out.append(Mismatch("rtmr3", found.hex(), f"{want.hex()} ({label})"))
    return out
