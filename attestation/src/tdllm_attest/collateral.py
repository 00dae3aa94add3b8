"""DCAP collateral: loading (files or an injected fetcher), signature checks and freshness.

The JSON layout is dcap-qvl's `QuoteCollateralV3` (PEM chains as text, CRLs and signatures as hex).
Collateral is checked here with `cryptography` before dcap-qvl sees it, so that a stale or badly
signed collateral is reported as a collateral failure with the exact reason, and so that freshness
limits stricter than "not yet expired" can be applied.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import dcap_qvl  # type: ignore[import-untyped]  # ships a .pyi but no py.typed marker
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tdllm_attest import memo
from tdllm_attest.abi import Quote
from tdllm_attest.chain import common_name, load_pem_chain, verify_chain
from tdllm_attest.clock import require_aware
from tdllm_attest.errors import ChainError, CollateralError, QuoteParseError
from tdllm_attest.trust import TrustAnchor

COLLATERAL_FIELDS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)
_HEX_FIELDS = ("root_ca_crl", "pck_crl", "tcb_info_signature", "qe_identity_signature")
TCB_INFO_ID_TDX = "TDX"
TCB_INFO_MIN_VERSION = 3
QE_IDENTITY_ID_TD_QE = "TD_QE"
ECDSA_P256_SIGNATURE_SIZE = 64
MAX_COLLATERAL_BYTES = 1024 * 1024
# How the PCK leaf's issuer CN ends -> the `ca` of the PCK CRL that covers it (`pckcrl?ca=`):
# Intel's "Intel SGX PCK Platform CA" and the simulated PKI's look-alike. It only picks which CRL
# to ask for; the CRL's issuer is then checked against the quote's PCK CA itself.
PCK_CA_TYPES = {"PCK Platform CA": "platform", "PCK Processor CA": "processor"}
# Intel's collateral is valid for 30 days; accepting all of it would let a host serve the oldest
# still-valid copy and hide a revocation or TCB recovery for weeks. A relying party that fetches
# its own collateral daily loses nothing with 24 hours.
DEFAULT_MAX_COLLATERAL_AGE = timedelta(hours=24)


@dataclass(frozen=True)
class SignedDocument:
    """TCB Info or QE Identity: the exact signed JSON text, its parsed form and key dates."""

    text: str
    signature: bytes
    issuer_chain: str
    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    tcb_evaluation_data_number: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Collateral:
    """Everything DCAP needs besides the quote and the trust anchor."""

    pck_crl_issuer_chain: str
    root_ca_crl: bytes
    pck_crl: bytes
    tcb_info: SignedDocument
    qe_identity: SignedDocument
    source_json: str

    @property
    def fmspc(self) -> str:
        """FMSPC the TCB Info applies to (upper-case hex)."""
        return str(self.tcb_info.body.get("fmspc", "")).upper()


@dataclass(frozen=True)
class FreshnessLimits:
    """Stricter-than-expiry limits on collateral, applied at `now`.

    `max_age`: TCB Info / QE Identity `issueDate` and the PCK CRL `thisUpdate` must be at most
    this old (the root CA CRL is only checked for expiry: Intel re-issues it about yearly);
    24 hours unless the relying party says otherwise, None only for offline forensics.
    `min_tcb_evaluation_data_number`: reject collateral from older TCB recovery events.
    """

    max_age: timedelta | None = DEFAULT_MAX_COLLATERAL_AGE
    min_tcb_evaluation_data_number: int | None = None


@dataclass(frozen=True)
class PckPlatform:
    """Which collateral a quote needs: its platform's FMSPC and the CA that issued its PCK leaf."""

    fmspc: str  # 12 upper-case hex digits, from the leaf's Intel SGX extension
    ca: str  # "platform" or "processor": which PCK CRL covers the leaf


def pck_fmspc(quote: Quote) -> str:
    """FMSPC (upper-case hex) from the Intel SGX extension of the quote's PCK leaf."""
    try:
        ext = dcap_qvl.parse_quote(quote.raw).pck_extension()
    except ValueError as exc:
        raise QuoteParseError(f"cannot read the PCK certificate extension: {exc}") from None
    if ext is None:
        raise ChainError("PCK leaf certificate has no Intel SGX extension")
    return bytes(ext.fmspc).hex().upper()


def pck_ca_type(quote: Quote) -> str:
    """The PCK CA type ("platform" or "processor") from the issuer CN of the quote's PCK leaf."""
    leaf = memo.certificate_from_der(quote.signature_data.pck_chain.leaf_der)
    names = leaf.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = names[0].value if len(names) == 1 else None
    if isinstance(cn, str):
        for suffix, ca in PCK_CA_TYPES.items():
            if cn.endswith(suffix):
                return ca
    raise ChainError(f"PCK leaf issuer CN {cn!r} is neither PCK Platform CA nor Processor CA")


def pck_platform(quote: Quote) -> PckPlatform:
    """FMSPC and PCK CA of the platform that produced `quote`: the key of its collateral."""
    return PckPlatform(fmspc=pck_fmspc(quote), ca=pck_ca_type(quote))


def _parse_time(value: object, what: str) -> datetime:
    if not isinstance(value, str):
        raise CollateralError(f"{what} is missing or not a string")
    try:
        return require_aware(datetime.fromisoformat(value))
    except ValueError:
        raise CollateralError(f"{what} {value!r} is not an ISO 8601 time with a zone") from None


def _signed_document(
    text: object, signature: bytes, chain: object, *, what: str, inner_key: str
) -> SignedDocument:
    if not isinstance(text, str) or not isinstance(chain, str):
        raise CollateralError(f"{what} or its issuer chain is missing or not text")
    try:
        body = json.loads(text)
    except ValueError:
        raise CollateralError(f"{what} is not valid JSON") from None
    if not isinstance(body, dict):
        raise CollateralError(f"{what} is not a JSON object")
    # PCS responses wrap the signed object ({"tcbInfo": {...}}); dcap-qvl's layout stores the
    # inner object text itself, which is what the signature covers.
    if inner_key in body and isinstance(body[inner_key], dict):
        raise CollateralError(f"{what} must be the signed {inner_key!r} object, not its wrapper")
    number = body.get("tcbEvaluationDataNumber")
    version = body.get("version")
    if not isinstance(number, int) or not isinstance(version, int):
        raise CollateralError(f"{what} lacks an integer version / tcbEvaluationDataNumber")
    return SignedDocument(
        text=text,
        signature=signature,
        issuer_chain=chain,
        id=str(body.get("id", "")),
        version=version,
        issue_date=_parse_time(body.get("issueDate"), f"{what} issueDate"),
        next_update=_parse_time(body.get("nextUpdate"), f"{what} nextUpdate"),
        tcb_evaluation_data_number=number,
        body=body,
    )


def collateral_from_json(text: str) -> Collateral:
    """Parse collateral in dcap-qvl's JSON layout; raises `CollateralError` on any defect."""
    if len(text) > MAX_COLLATERAL_BYTES:
        raise CollateralError(f"collateral of {len(text)} bytes exceeds {MAX_COLLATERAL_BYTES}")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise CollateralError(f"collateral is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise CollateralError("collateral is not a JSON object")
    missing = [f for f in COLLATERAL_FIELDS if f not in doc]
    if missing:
        raise CollateralError(f"collateral lacks field(s): {', '.join(missing)}")
    raw: dict[str, bytes] = {}
    for name in _HEX_FIELDS:
        value = doc[name]
        try:
            raw[name] = bytes.fromhex(value) if isinstance(value, str) else bytes(value)
        except (ValueError, TypeError):
            raise CollateralError(f"collateral field {name} is not hex bytes") from None
    if not isinstance(doc["pck_crl_issuer_chain"], str):
        raise CollateralError("collateral field pck_crl_issuer_chain is not text")
    return Collateral(
        pck_crl_issuer_chain=doc["pck_crl_issuer_chain"],
        root_ca_crl=raw["root_ca_crl"],
        pck_crl=raw["pck_crl"],
        tcb_info=_signed_document(
            doc["tcb_info"],
            raw["tcb_info_signature"],
            doc["tcb_info_issuer_chain"],
            what="TCB Info",
            inner_key="tcbInfo",
        ),
        qe_identity=_signed_document(
            doc["qe_identity"],
            raw["qe_identity_signature"],
            doc["qe_identity_issuer_chain"],
            what="QE Identity",
            inner_key="enclaveIdentity",
        ),
        source_json=text,
    )


def load_collateral(path: str | Path) -> Collateral:
    """Read collateral from a file (tests, offline users)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CollateralError(f"cannot read collateral file {path}: {exc}") from None
    return collateral_from_json(text)


class CollateralSource(Protocol):
    """Where collateral comes from for a given quote."""

    def get(self, raw_quote: bytes) -> Collateral:
        """Return collateral for the platform that produced `raw_quote`."""
        ...


@dataclass(frozen=True)
class FileCollateralSource:
    """Collateral from one file, whatever the quote (offline verification)."""

    path: Path

    def get(self, raw_quote: bytes) -> Collateral:
        return load_collateral(self.path)


@dataclass(frozen=True)
class FetcherCollateralSource:
    """Collateral from an injected callable (e.g. a PCS/PCCS client); it returns the JSON text.

    The fetcher is the only place network access may happen; any exception it raises is turned
    into a `CollateralError` so that an unreachable source fails closed.
    """

    fetch: Callable[[bytes], str]

    def get(self, raw_quote: bytes) -> Collateral:
        try:
            text = self.fetch(raw_quote)
        except Exception as exc:  # any fetch failure must fail closed as a collateral error
            raise CollateralError(f"collateral fetch failed: {exc}") from None
        if not isinstance(text, str):
            raise CollateralError("collateral fetcher returned something other than JSON text")
        return collateral_from_json(text)


def _age(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:.1f} h" if hours < 72 else f"{hours / 24:.1f} days"


def _load_crl(der: bytes, what: str) -> x509.CertificateRevocationList:
    try:
        return memo.crl_from_der(der)
    except ValueError:
        raise CollateralError(f"{what} is not a DER CRL") from None


def _check_crl(
    crl_der: bytes,
    issuer: x509.Certificate,
    now: datetime,
    limits: FreshnessLimits,
    what: str,
    *,
    apply_max_age: bool = True,
) -> None:
    crl = _load_crl(crl_der, what)
    if crl.issuer != issuer.subject:
        raise CollateralError(f"{what} is issued by {crl.issuer.rfc4514_string()!r}, not the CA")
    public_key = issuer.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not memo.crl_signature_valid(
        crl, crl_der, public_key, memo.der_of(issuer)
    ):
        raise CollateralError(f"{what} signature does not verify")
    next_update = crl.next_update_utc
    if next_update is None or not crl.last_update_utc <= now <= next_update:
        raise CollateralError(
            f"{what} is not current at {now.isoformat()} (thisUpdate "
            f"{crl.last_update_utc.isoformat()}, nextUpdate "
            f"{next_update.isoformat() if next_update else 'missing'})"
        )
    if apply_max_age and limits.max_age is not None and now - crl.last_update_utc > limits.max_age:
        raise CollateralError(
            f"{what} was issued {_age(now - crl.last_update_utc)} ago, more than the freshness "
            f"limit {_age(limits.max_age)}"
        )


def _check_signer(
    chain: list[x509.Certificate], anchor: TrustAnchor, root_crl_der: bytes, what: str
) -> None:
    """The signer is the pinned TCB Signing identity, issued by the root, not revoked by it."""
    signer = chain[0]
    if common_name(signer) != anchor.tcb_signing_cn:
        raise CollateralError(
            f"{what} is signed by {common_name(signer)!r}, not by {anchor.tcb_signing_cn!r}"
        )
    crl = _load_crl(root_crl_der, "root CA CRL")
    if crl.get_revoked_certificate_by_serial_number(signer.serial_number) is not None:
        raise CollateralError(
            f"{what} signing certificate (serial {signer.serial_number:x}) is revoked by the root"
        )


def _check_document(
    doc: SignedDocument,
    anchor: TrustAnchor,
    now: datetime,
    limits: FreshnessLimits,
    what: str,
    *,
    root_crl_der: bytes,
) -> None:
    chain = load_pem_chain(doc.issuer_chain, error=CollateralError, what=f"{what} issuer chain")
    # Exactly [TCB Signing, root]: a look-alike under the PCK CA would make the chain longer.
    verify_chain(chain, anchor, now, error=CollateralError, what=f"{what} issuer chain", length=2)
    _check_signer(chain, anchor, root_crl_der, what)
    if len(doc.signature) != ECDSA_P256_SIGNATURE_SIZE:
        raise CollateralError(f"{what} signature is {len(doc.signature)} bytes, want 64 (r||s)")
    key = chain[0].public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CollateralError(f"{what} signing certificate does not hold an EC key")
    r = int.from_bytes(doc.signature[:32], "big")
    s = int.from_bytes(doc.signature[32:], "big")
    try:
        # The signature covers the exact text served by Intel; re-serialising would break it.
        memo.check_ecdsa_sha256(
            key, memo.der_of(chain[0]), encode_dss_signature(r, s), doc.text.encode()
        )
    except InvalidSignature:
        raise CollateralError(f"{what} signature does not verify over its JSON text") from None
    if not doc.issue_date <= now <= doc.next_update:
        raise CollateralError(
            f"{what} is not current at {now.isoformat()} (issueDate {doc.issue_date.isoformat()}, "
            f"nextUpdate {doc.next_update.isoformat()})"
        )
    if limits.max_age is not None and now - doc.issue_date > limits.max_age:
        raise CollateralError(
            f"{what} was issued {_age(now - doc.issue_date)} ago, more than the freshness limit "
            f"{_age(limits.max_age)}"
        )
    minimum = limits.min_tcb_evaluation_data_number
    if minimum is not None and doc.tcb_evaluation_data_number < minimum:
        raise CollateralError(
            f"{what} tcbEvaluationDataNumber {doc.tcb_evaluation_data_number} is below {minimum}"
        )


def check_collateral(
    collateral: Collateral,
    *,
    pck_ca: x509.Certificate,
    fmspc: str,
    anchor: TrustAnchor,
    now: datetime,
    limits: FreshnessLimits | None = None,
) -> str:
    """Check collateral signatures, chains, identity fields and freshness at `now`; return how
    fresh it was (for per-check reports).

    `pck_ca` is the quote's intermediate (PCK Platform/Processor CA) whose CRL must be supplied;
    `fmspc` is the quote's platform (from the PCK leaf).
    """
    now = require_aware(now)
    limits = limits or FreshnessLimits()
    tcb, qe = collateral.tcb_info, collateral.qe_identity
    if tcb.id != TCB_INFO_ID_TDX or tcb.version < TCB_INFO_MIN_VERSION:
        raise CollateralError(f"TCB Info id/version {tcb.id!r}/{tcb.version} is not TDX v3+")
    if qe.id != QE_IDENTITY_ID_TD_QE:
        raise CollateralError(f"QE Identity id {qe.id!r} is not {QE_IDENTITY_ID_TD_QE!r}")
    if collateral.fmspc != fmspc.upper():
        raise CollateralError(
            f"TCB Info is for FMSPC {collateral.fmspc}, the quote's platform is {fmspc.upper()}"
        )
    # The root CRL first: it decides whether the TCB Signing certificate is still good.
    _check_crl(
        collateral.root_ca_crl,
        anchor.certificate,
        now,
        limits,
        "root CA CRL",
        apply_max_age=False,  # Intel re-issues the root CRL about yearly; expiry still applies
    )
    root_crl = collateral.root_ca_crl
    _check_document(tcb, anchor, now, limits, "TCB Info", root_crl_der=root_crl)
    _check_document(qe, anchor, now, limits, "QE Identity", root_crl_der=root_crl)
    crl_chain = load_pem_chain(
        collateral.pck_crl_issuer_chain, error=CollateralError, what="PCK CRL issuer chain"
    )
    verify_chain(
        crl_chain,
        anchor,
        now,
        error=CollateralError,
        what="PCK CRL issuer chain",
        length=2,
        leaf_is_ca=True,
    )
    if crl_chain[0].subject != pck_ca.subject or crl_chain[0].public_key() != pck_ca.public_key():
        raise CollateralError("PCK CRL issuer is not the quote's PCK CA")
    _check_crl(collateral.pck_crl, pck_ca, now, limits, "PCK CRL")
    oldest = min(
        tcb.issue_date, qe.issue_date, _load_crl(collateral.pck_crl, "PCK CRL").last_update_utc
    )
    limit = "none" if limits.max_age is None else _age(limits.max_age)
    return (
        f"oldest part issued {_age(now - oldest)} before the verification time (limit {limit}); "
        f"tcbEvaluationDataNumber {tcb.tcb_evaluation_data_number}"
    )
