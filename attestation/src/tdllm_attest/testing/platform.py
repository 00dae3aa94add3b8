"""UNSAFE simulated TDX: a run-time test PKI that signs synthetic quotes and collateral.

Nothing here is evidence of anything. `SimulatedTdxPlatform` generates, in memory, a test root
("TDLLM UNSAFE TEST ROOT"; no vendor name, as `TrustAnchor` refuses look-alikes), a PCK Platform
CA, a PCK leaf carrying the (public) Intel SGX extension of a real platform, a TCB-signing
certificate and both CRLs, then signs v4 TDX quotes and TCB Info / QE Identity documents.
The results pass the very same `verify_quote` path (framing, collateral, `cryptography`
cross-check, dcap-qvl) with only the trust anchor changed, so CI exercises production
verification without TDX hardware. Private keys never leave the object.

The test root is usable only through `tdllm_attest.trust.simulated_trust_anchor`, which demands
BOTH the configured mode "simulated" AND the environment variable `TDLLM_ALLOW_SIMULATED_TDX=1`,
and logs a warning every time. Results verified against it carry `simulated=True`. Production
modules never import this package (an import-linter contract, pyproject.toml).
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib import resources
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from tdllm_attest import abi
from tdllm_attest.clock import require_aware
from tdllm_attest.trust import SIMULATED_TCB_SIGNING_CN

UNSAFE_TEST_ROOT_CN = "TDLLM UNSAFE TEST ROOT - SIMULATED TDX ONLY - NOT A VENDOR ROOT"
SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_TEMPLATE_FILE = "simulated_template.json"
_CERT_LIFETIME = timedelta(days=365)
_COLLATERAL_LIFETIME = timedelta(days=30)
_BACKDATE = timedelta(hours=1)
_P256_HALF = 32
# Who signs a simulated TCB Info / QE Identity: the real role, or one of the signer attacks.
CollateralSigner = Literal["tcb_signer", "pck_leaf", "pck_ca", "pck_ca_lookalike"]


def _template() -> dict[str, Any]:
    text = resources.files(__package__).joinpath(_TEMPLATE_FILE).read_text(encoding="utf-8")
    doc: dict[str, Any] = json.loads(text)
    return doc


def _raw_signature(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(_P256_HALF, "big") + s.to_bytes(_P256_HALF, "big")


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TDLLM UNSAFE TEST PKI"),
        ]
    )


def _time(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class SyntheticTdFields:
    """The TD report fields of a synthetic quote; defaults are those of the template platform."""

    report_data: bytes = bytes(abi.REPORT_DATA_SIZE)
    mr_td: bytes | None = None
    rtmrs: tuple[bytes, bytes, bytes, bytes] | None = None
    td_attributes: int | None = None
    xfam: bytes | None = None
    tee_tcb_svn: bytes | None = None
    mr_config_id: bytes | None = None
    mr_owner: bytes | None = None
    mr_owner_config: bytes | None = None


@dataclass(frozen=True)
class _Issued:
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    cert: x509.Certificate

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(Encoding.PEM).decode()


class SimulatedTdxPlatform:
    """UNSAFE: a fake TDX platform + fake Intel PKI, generated in memory at `now`.

    `quote()` makes v4 quotes, `collateral_json()` the matching dcap-qvl collateral; both verify
    only against `root_der` (use `tdllm_attest.trust.simulated_trust_anchor`). Certificates are
    valid a year from `now` minus an hour, collateral and CRLs 30 days.

    `validity` overrides the (not before, not after) period of named certificates, for negative
    tests of expired / not-yet-valid certificates: keys "root", "pck_ca", "pck_leaf",
    "tcb_signer".
    """

    CERTIFICATE_NAMES = frozenset({"root", "pck_ca", "pck_leaf", "tcb_signer"})

    def __init__(
        self, now: datetime, *, validity: Mapping[str, tuple[datetime, datetime]] | None = None
    ) -> None:
        self.now = require_aware(now)
        self._validity = dict(validity or {})
        unknown = set(self._validity) - self.CERTIFICATE_NAMES
        if unknown:
            raise ValueError(f"unknown certificate name(s) in validity: {sorted(unknown)}")
        self._template = _template()
        self._root = self._issue(UNSAFE_TEST_ROOT_CN, None, ca=True, name="root")
        self._pck_ca = self._issue(
            "TDLLM UNSAFE TEST PCK Platform CA", self._root, ca=True, name="pck_ca"
        )
        self._tcb_signer = self._issue(
            SIMULATED_TCB_SIGNING_CN, self._root, ca=False, name="tcb_signer"
        )
        self._pck_leaf = self._issue(
            "TDLLM UNSAFE TEST PCK Certificate",
            self._pck_ca,
            ca=False,
            name="pck_leaf",
            extra=x509.UnrecognizedExtension(
                SGX_EXTENSION_OID, bytes.fromhex(self._template["pck_sgx_extension_der"])
            ),
        )

    @property
    def root_der(self) -> bytes:
        """DER of the UNSAFE test root (the only thing a verifier may pin for simulated mode)."""
        return self._root.cert.public_bytes(Encoding.DER)

    def _issue(
        self,
        cn: str,
        issuer: _Issued | None,
        *,
        ca: bool,
        name: str,
        extra: x509.ExtensionType | None = None,
    ) -> _Issued:
        not_before, not_after = self._validity.get(
            name, (self.now - _BACKDATE, self.now + _CERT_LIFETIME)
        )
        key = ec.generate_private_key(ec.SECP256R1())
        issuer_key = issuer.key if issuer else key
        issuer_name = issuer.cert.subject if issuer else _name(cn)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        aki_key = issuer_key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(require_aware(not_before))
            .not_valid_after(require_aware(not_after))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=not ca,
                    content_commitment=not ca,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=ca,
                    crl_sign=ca,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(aki_key), critical=False
            )
        )
        if extra is not None:
            builder = builder.add_extension(extra, critical=False)
        return _Issued(key, builder.sign(issuer_key, hashes.SHA256()))

    def _crl(self, issuer: _Issued, *revoked: x509.Certificate) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.cert.subject)
            .last_update(self.now - _BACKDATE)
            .next_update(self.now + _COLLATERAL_LIFETIME)
            .add_extension(x509.CRLNumber(1), critical=False)
        )
        for cert in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(self.now - _BACKDATE)
                .build()
            )
        return builder.sign(issuer.key, hashes.SHA256()).public_bytes(Encoding.DER)

    def _collateral_signer(self, signer: CollateralSigner) -> tuple[_Issued, str]:
        """(signing key + certificate, issuer chain PEM) of who signs TCB Info / QE Identity."""
        root_pem = self._root.pem
        if signer == "tcb_signer":
            return self._tcb_signer, self._tcb_signer.pem + root_pem
        if signer == "pck_leaf":  # the attack: a leaked PCK key re-signs the TCB levels
            return self._pck_leaf, self._pck_leaf.pem + self._pck_ca.pem + root_pem
        if signer == "pck_ca":
            return self._pck_ca, self._pck_ca.pem + root_pem
        # a certificate named like the TCB signer, but issued by the PCK CA
        lookalike = self._issue(SIMULATED_TCB_SIGNING_CN, self._pck_ca, ca=False, name="")
        return lookalike, lookalike.pem + self._pck_ca.pem + root_pem

    @staticmethod
    def _signed(doc: dict[str, Any], signer: _Issued) -> tuple[str, str]:
        text = json.dumps(doc, separators=(",", ":"))
        return text, _raw_signature(signer.key, text.encode()).hex()

    def collateral_json(
        self,
        *,
        tcb_status: str = "UpToDate",
        revoke_pck_leaf: bool = False,
        revoke_pck_ca: bool = False,
        qe_identity_changes: Mapping[str, Any] | None = None,
        signer: CollateralSigner = "tcb_signer",
        revoke_tcb_signer: bool = False,
    ) -> str:
        """dcap-qvl `QuoteCollateralV3` JSON signed by the test PKI.

        `tcb_status` replaces the status of the platform TCB level the default quote matches
        (e.g. "OutOfDate", "Revoked"); the revoke switches list a certificate in a CRL;
        `qe_identity_changes` replaces top-level QE Identity fields before it is signed (e.g.
        `{"mrsigner": ...}`, `{"isvprodid": 3}`, `{"attributes": ...}`, `{"tcbLevels": [...]}`),
        so that a validly signed QE Identity can disagree with the quote's QE report.
        `signer` picks who signs TCB Info and QE Identity (the attacks: a PCK leaf, the PCK CA,
        or a TCB-signer look-alike issued by the PCK CA); `revoke_tcb_signer` lists the TCB
        Signing certificate in the root CA CRL.
        """
        tcb_info = copy.deepcopy(self._template["tcb_info"])
        qe_identity = copy.deepcopy(self._template["qe_identity"])
        for doc in (tcb_info, qe_identity):
            doc["issueDate"] = _time(self.now - _BACKDATE)
            doc["nextUpdate"] = _time(self.now + _COLLATERAL_LIFETIME)
        tcb_info["tcbLevels"][0]["tcbStatus"] = tcb_status
        qe_identity.update(copy.deepcopy(dict(qe_identity_changes or {})))
        signing, signing_chain = self._collateral_signer(signer)
        tcb_text, tcb_sig = self._signed(tcb_info, signing)
        qe_text, qe_sig = self._signed(qe_identity, signing)
        revoked_by_root = [self._pck_ca.cert] if revoke_pck_ca else []
        revoked_by_root += [self._tcb_signer.cert] if revoke_tcb_signer else []
        return json.dumps(
            {
                "pck_crl_issuer_chain": self._pck_ca.pem + self._root.pem,
                "root_ca_crl": self._crl(self._root, *revoked_by_root).hex(),
                "pck_crl": self._crl(
                    self._pck_ca, *([self._pck_leaf.cert] if revoke_pck_leaf else [])
                ).hex(),
                "tcb_info_issuer_chain": signing_chain,
                "tcb_info": tcb_text,
                "tcb_info_signature": tcb_sig,
                "qe_identity_issuer_chain": signing_chain,
                "qe_identity": qe_text,
                "qe_identity_signature": qe_sig,
            }
        )

    def _header_and_body(self, fields: SyntheticTdFields) -> bytes:
        template = bytearray(bytes.fromhex(self._template["header_and_body"]))
        if len(fields.report_data) != abi.REPORT_DATA_SIZE:
            raise ValueError(f"report_data must be {abi.REPORT_DATA_SIZE} bytes")
        body = abi.HEADER_SIZE
        offsets = {  # offsets inside TD report 1.0
            "tee_tcb_svn": 0,
            "td_attributes": 120,
            "xfam": 128,
            "mr_td": 136,
            "mr_config_id": 184,
            "mr_owner": 232,
            "mr_owner_config": 280,
            "rtmrs": 328,
            "report_data": 520,
        }
        values: dict[str, bytes | None] = {
            "tee_tcb_svn": fields.tee_tcb_svn,
            "td_attributes": None
            if fields.td_attributes is None
            else fields.td_attributes.to_bytes(abi.TD_ATTRIBUTES_SIZE, "little"),
            "xfam": fields.xfam,
            "mr_td": fields.mr_td,
            "mr_config_id": fields.mr_config_id,
            "mr_owner": fields.mr_owner,
            "mr_owner_config": fields.mr_owner_config,
            "rtmrs": None if fields.rtmrs is None else b"".join(fields.rtmrs),
            "report_data": fields.report_data,
        }
        sizes = {"rtmrs": abi.RTMR_SIZE * abi.RTMR_COUNT, "report_data": abi.REPORT_DATA_SIZE}
        sizes |= {"tee_tcb_svn": 16, "td_attributes": 8, "xfam": 8}
        for name, value in values.items():
            if value is None:
                continue
            size = sizes.get(name, abi.MR_TD_SIZE)
            if len(value) != size:
                raise ValueError(f"{name} must be {size} bytes, got {len(value)}")
            start = body + offsets[name]
            template[start : start + size] = value
        return bytes(template)

    def quote(self, fields: SyntheticTdFields | None = None) -> bytes:
        """A v4 TDX quote over `fields`, signed by a fresh attestation key of the test PKI."""
        signed = self._header_and_body(fields or SyntheticTdFields())
        ak = ec.generate_private_key(ec.SECP256R1())
        ak_raw = ak.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)[1:]
        auth = bytes.fromhex(self._template["qe_auth_data"])
        qe_report = bytearray(bytes.fromhex(self._template["qe_report"]))
        binding = hashlib.sha256(ak_raw + auth).digest() + bytes(_P256_HALF)
        start = abi.QE_REPORT_DATA_OFFSET
        qe_report[start : start + abi.QE_REPORT_DATA_SIZE] = binding
        chain = (self._pck_leaf.pem + self._pck_ca.pem + self._root.pem).encode() + b"\x00"
        inner = struct.pack("<HI", abi.CERT_TYPE_PCK_CERT_CHAIN, len(chain)) + chain
        certification = (
            bytes(qe_report)
            + _raw_signature(self._pck_leaf.key, bytes(qe_report))
            + struct.pack("<H", len(auth))
            + auth
            + inner
        )
        signature_data = (
            _raw_signature(ak, signed)
            + ak_raw
            + struct.pack("<HI", abi.CERT_TYPE_QE_REPORT_CERTIFICATION_DATA, len(certification))
            + certification
        )
        return signed + struct.pack("<I", len(signature_data)) + signature_data
