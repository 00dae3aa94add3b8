"""§8.6 groups 8, 14, 16 and 17 on signed synthetic quotes and collateral (UNSAFE test PKI).

Each case is a validly signed piece of evidence that must still be refused, with the error class
(and, for policy cases, the mismatching field) it must be refused with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest

from tdllm_attest.abi import (
    TD_ATTRIBUTE_DEBUG,
    TD_ATTRIBUTE_SEPT_VE_DISABLE,
    TdReport10,
    parse_quote,
)
from tdllm_attest.collateral import collateral_from_json
from tdllm_attest.errors import (
    AttestationError,
    ChainError,
    CollateralError,
    PolicyMismatch,
    SignatureError,
    TcbStatusError,
)
from tdllm_attest.policy import check_tcb, validate
from tdllm_attest.policy_format import MeasurementTuple
from tdllm_attest.testing.platform import SimulatedTdxPlatform, SyntheticTdFields
from tdllm_attest.trust import simulated_trust_anchor
from tdllm_attest.verify import VerifiedQuote, verify_quote
from tests.attestation.simulated_broker import (
    MR_TD,
    RTMRS,
    SIM_NOW,
    SIMULATED_ENV,
    policy_for_template,
    td_fields,
)

DAY = timedelta(days=1)
EXPIRED = (SIM_NOW - 3 * DAY, SIM_NOW - DAY)
NOT_YET_VALID = (SIM_NOW + DAY, SIM_NOW + 3 * DAY)


pytestmark = pytest.mark.usefixtures("quiet_simulated_warnings")


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(SIM_NOW)


def _verify(
    platform: SimulatedTdxPlatform,
    fields: SyntheticTdFields | None = None,
    **collateral_options: Any,
) -> VerifiedQuote:
    anchor = simulated_trust_anchor(platform.root_der, mode="simulated", environ=SIMULATED_ENV)
    collateral = collateral_from_json(platform.collateral_json(**collateral_options))
    return verify_quote(
        platform.quote(fields or td_fields()), collateral, now=SIM_NOW, anchor=anchor
    )


def test_the_unmodified_synthetic_evidence_passes_every_check(
    platform: SimulatedTdxPlatform,
) -> None:
    verified = _verify(platform)
    check_tcb(verified)
    validate(verified, policy_for_template(platform))


# --- group 8: certificates expired / not yet valid; revoked through a CRL -----------------------


@dataclass(frozen=True)
class CertCase:
    name: str
    validity: dict[str, tuple[datetime, datetime]]
    collateral: dict[str, bool]
    error: type[AttestationError]
    message: str


CERT_CASES = [
    CertCase("PCK leaf expired", {"pck_leaf": EXPIRED}, {}, ChainError, "not valid at"),
    CertCase("PCK leaf not yet valid", {"pck_leaf": NOT_YET_VALID}, {}, ChainError, "not valid"),
    # The PCK CA also issues the PCK CRL, so its validity is first checked on the CRL's chain.
    CertCase("PCK CA expired", {"pck_ca": EXPIRED}, {}, CollateralError, "not valid at"),
    CertCase("PCK CA not yet valid", {"pck_ca": NOT_YET_VALID}, {}, CollateralError, "not valid"),
    CertCase(
        "TCB signing certificate expired", {"tcb_signer": EXPIRED}, {}, CollateralError, "not valid"
    ),
    CertCase(
        "PCK leaf revoked in the PCK CRL", {}, {"revoke_pck_leaf": True}, ChainError, "revoked"
    ),
    CertCase(
        "PCK CA revoked in the root CA CRL", {}, {"revoke_pck_ca": True}, ChainError, "revoked"
    ),
]


@pytest.mark.parametrize("case", CERT_CASES, ids=lambda c: c.name)
def test_certificate_outside_its_validity_or_revoked_is_refused(case: CertCase) -> None:
    platform = SimulatedTdxPlatform(SIM_NOW, validity=case.validity)
    with pytest.raises(case.error, match=case.message):
        _verify(platform, None, **case.collateral)


def test_an_unknown_certificate_name_in_validity_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown certificate"):
        SimulatedTdxPlatform(SIM_NOW, validity={"pck": EXPIRED})


# --- group 14: the QE report against a re-signed QE Identity ------------------------------------


@dataclass(frozen=True)
class QeCase:
    name: str
    changes: dict[str, Any]
    error: type[AttestationError]
    message: str


QE_LEVEL_ABOVE_ALL = [
    {"tcb": {"isvsvn": 99}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": "UpToDate"}
]
QE_CASES = [
    QeCase(
        "QE ISVSVN below all QE Identity levels",
        {"tcbLevels": QE_LEVEL_ABOVE_ALL},
        TcbStatusError,
        "ISVSVN",
    ),
    QeCase("QE MRSIGNER mismatch", {"mrsigner": "00" * 32}, SignatureError, "MRSIGNER"),
    QeCase("QE ISVPRODID mismatch", {"isvprodid": 3}, SignatureError, "ISVPRODID"),
    QeCase(
        "QE attributes mismatch", {"attributes": "01" + "00" * 15}, SignatureError, "ATTRIBUTES"
    ),
    QeCase("QE MISCSELECT mismatch", {"miscselect": "00000001"}, SignatureError, "MISCSELECT"),
]


@pytest.mark.parametrize("case", QE_CASES, ids=lambda c: c.name)
def test_qe_report_not_matching_a_validly_signed_qe_identity_is_refused(
    platform: SimulatedTdxPlatform, case: QeCase
) -> None:
    with pytest.raises(case.error, match=case.message) as caught:
        _verify(platform, qe_identity_changes=case.changes)
    assert type(caught.value) is case.error


# --- groups 16 and 17: TD attributes, XFAM and measurements of a genuine (synthetic) TD ---------


def _template_report(platform: SimulatedTdxPlatform) -> TdReport10:
    report = parse_quote(platform.quote(td_fields())).td_report
    assert isinstance(report, TdReport10)
    return report


def _flip(value: bytes, bit: int = 0) -> bytes:
    out = bytearray(value)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _rtmr_flipped(i: int) -> Callable[[SyntheticTdFields, TdReport10], SyntheticTdFields]:
    def change(f: SyntheticTdFields, _r: TdReport10) -> SyntheticTdFields:
        rtmrs = list(RTMRS)
        rtmrs[i] = _flip(rtmrs[i], 7)
        return dataclasses.replace(f, rtmrs=(rtmrs[0], rtmrs[1], rtmrs[2], rtmrs[3]))

    return change


def _attrs(transform: Callable[[int], int]) -> Callable[[SyntheticTdFields, TdReport10], Any]:
    return lambda f, r: dataclasses.replace(f, td_attributes=transform(r.td_attributes_value))


@dataclass(frozen=True)
class TdCase:
    name: str
    change: Callable[[SyntheticTdFields, TdReport10], SyntheticTdFields]
    fields: tuple[str, ...]  # the mismatching fields (prefixes) the report must name


TD_CASES = [
    # group 16
    TdCase("DEBUG set", _attrs(lambda a: a | TD_ATTRIBUTE_DEBUG), ("td_attributes",)),
    TdCase(
        "SEPT_VE_DISABLE clear",
        _attrs(lambda a: a & ~TD_ATTRIBUTE_SEPT_VE_DISABLE),
        ("td_attributes",),
    ),
    TdCase("reserved TD attribute bit set", _attrs(lambda a: a | (1 << 20)), ("td_attributes",)),
    TdCase(
        "XFAM not allowed", lambda f, r: dataclasses.replace(f, xfam=_flip(r.xfam, 9)), ("xfam",)
    ),
    # group 17
    TdCase(
        "MRTD off by one bit",
        lambda f, r: dataclasses.replace(f, mr_td=_flip(MR_TD, 5)),
        ("measurements",),
    ),
    TdCase("RTMR0 off by one bit", _rtmr_flipped(0), ("measurements",)),
    TdCase("RTMR1 off by one bit", _rtmr_flipped(1), ("measurements",)),
    TdCase("RTMR2 off by one bit", _rtmr_flipped(2), ("measurements",)),
    TdCase("RTMR3 off by one bit", _rtmr_flipped(3), ("rtmr3",)),
    TdCase(
        "mixed tuple (MRTD of release A with RTMRs of release B)",
        lambda f, r: dataclasses.replace(f, mr_td=b"\xaa" * 48),
        ("measurements",),
    ),
    TdCase(
        "unexpected MRCONFIGID",
        lambda f, r: dataclasses.replace(f, mr_config_id=_flip(r.mr_config_id)),
        ("mr_config_id",),
    ),
    TdCase(
        "unexpected MROWNER",
        lambda f, r: dataclasses.replace(f, mr_owner=_flip(r.mr_owner)),
        ("mr_owner",),
    ),
    TdCase(
        "unexpected MROWNERCONFIG",
        lambda f, r: dataclasses.replace(f, mr_owner_config=_flip(r.mr_owner_config)),
        ("mr_owner_config",),
    ),
]


@pytest.mark.parametrize("case", TD_CASES, ids=lambda c: c.name)
def test_genuine_td_with_refused_attributes_or_measurements_fails_policy(
    platform: SimulatedTdxPlatform, case: TdCase
) -> None:
    policy = policy_for_template(platform)
    # A second release whose registers are each valid alone: (MRTD B, RTMRs A) must not pass.
    policy = dataclasses.replace(
        policy,
        measurements=(
            *policy.measurements,
            MeasurementTuple("release-b", b"\xaa" * 48, b"\xbb" * 48, b"\xcc" * 48, b"\xdd" * 48),
        ),
    )
    fields = case.change(td_fields(), _template_report(platform))
    with pytest.raises(PolicyMismatch) as caught:
        verified = _verify(platform, fields)  # dcap-qvl may already refuse the TD attributes
        check_tcb(verified)
        validate(verified, policy)
    named = {m.field for m in caught.value.mismatches}
    assert all(any(n.startswith(f) for n in named) for f in case.fields), caught.value
