"""§8.6 group 12: judging the TCB status (`policy.check_tcb`): UpToDate by default, listed
statuses with allow-listed advisories, Revoked never, and the TCB-recovery grace window."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

import pytest

from tdllm_attest.errors import TcbStatusError
from tdllm_attest.policy import check_tcb
from tdllm_attest.policy_format import TcbPolicy
from tdllm_attest.verify import VerifiedQuote


@pytest.mark.parametrize(
    "status",
    [
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
        "ConfigurationNeeded",
        "SWHardeningNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "Revoked",
    ],
)
def test_rejects_non_up_to_date_tcb_status_by_default(
    verified_v4: VerifiedQuote, status: str
) -> None:
    with pytest.raises(TcbStatusError, match=status):
        check_tcb(dataclasses.replace(verified_v4, tcb_status=status))


def test_accepts_up_to_date_tcb_status_by_default(verified_v4: VerifiedQuote) -> None:
    check_tcb(verified_v4)


def test_rejects_revoked_even_when_the_policy_lists_it(verified_v4: VerifiedQuote) -> None:
    tcb = TcbPolicy(accepted_statuses=frozenset({"UpToDate", "Revoked"}))
    with pytest.raises(TcbStatusError):
        check_tcb(dataclasses.replace(verified_v4, tcb_status="Revoked"), tcb)


def test_sw_hardening_needed_passes_only_with_allow_listed_advisories(
    verified_v4: VerifiedQuote,
) -> None:
    v = dataclasses.replace(
        verified_v4, tcb_status="SWHardeningNeeded", advisory_ids=("INTEL-SA-00615",)
    )
    statuses = frozenset({"UpToDate", "SWHardeningNeeded"})
    with pytest.raises(TcbStatusError, match="INTEL-SA-00615"):
        check_tcb(v, TcbPolicy(accepted_statuses=statuses))
    check_tcb(
        v, TcbPolicy(accepted_statuses=statuses, allowed_advisories=frozenset({"INTEL-SA-00615"}))
    )


def test_rejects_tcb_evaluation_data_number_below_the_policy_minimum(
    verified_v4: VerifiedQuote,
) -> None:
    with pytest.raises(TcbStatusError, match="evaluation data number"):
        check_tcb(verified_v4, TcbPolicy(min_tcb_evaluation_data_number=18))


def _out_of_date(verified: VerifiedQuote, days_after_tcb_date: float) -> VerifiedQuote:
    """The real v4 quote as if its TCB level had gone OutOfDate, verified that long after."""
    assert verified.tcb_date is not None
    when = datetime.fromisoformat(verified.tcb_date) + timedelta(days=days_after_tcb_date)
    return dataclasses.replace(
        verified,
        tcb_status="OutOfDate",
        advisory_ids=("INTEL-SA-01234",),
        verified_at=when,
    )


def test_out_of_date_is_accepted_only_within_the_tcb_recovery_grace(
    verified_v4: VerifiedQuote,
) -> None:
    grace = TcbPolicy(out_of_date_grace=timedelta(days=30))
    decision = check_tcb(_out_of_date(verified_v4, 29), grace)
    assert "within the TCB-recovery grace" in decision and "INTEL-SA-01234" in decision
    with pytest.raises(TcbStatusError, match="grace ended"):
        check_tcb(_out_of_date(verified_v4, 31), grace)
    with pytest.raises(TcbStatusError, match="OutOfDate"):  # no grace configured
        check_tcb(_out_of_date(verified_v4, 1))


def test_grace_never_admits_revoked_or_other_statuses(verified_v4: VerifiedQuote) -> None:
    grace = TcbPolicy(out_of_date_grace=timedelta(days=30))
    for status in ("Revoked", "ConfigurationNeeded", "SWHardeningNeeded"):
        with pytest.raises(TcbStatusError, match=status):
            check_tcb(dataclasses.replace(_out_of_date(verified_v4, 1), tcb_status=status), grace)


def test_grace_still_enforces_the_minimum_tcb_evaluation_data_number(
    verified_v4: VerifiedQuote,
) -> None:
    tcb = TcbPolicy(out_of_date_grace=timedelta(days=30), min_tcb_evaluation_data_number=18)
    with pytest.raises(TcbStatusError, match="evaluation data number"):
        check_tcb(_out_of_date(verified_v4, 1), tcb)
