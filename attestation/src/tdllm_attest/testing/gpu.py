"""UNSAFE synthetic NVIDIA GPU: a run-time test PKI that signs SPDM reports and RIMs.

Nothing here is evidence of anything. `SyntheticGpu` generates, in memory, a device PKI shaped
like NVIDIA's (root -> identity CA -> provisioner CA -> BROM -> leaf with the TCG DICE FWID
extension; five certificates, ECDSA P-384) and a RIM PKI (root -> signer), every subject CN
saying "UNSAFE TEST" and none claiming NVIDIA (`GpuAnchors` refuses look-alikes). `collect`
produces a correctly signed GET_MEASUREMENTS request||response for a nonce, `rim_xml` /
`write_rims` the matching RIMs in NVIDIA's XML shape, signed with signxml. Both pass the very same
`tdllm_attest.gpu` verification as a real Hopper with only the anchors changed, which `anchors()`
hands out solely through the simulated gate (mode "simulated" AND TDLLM_ALLOW_SIMULATED_TDX=1).
Keyword knobs on `collect` and `rim_xml` make the bad variants the attack tests need.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from lxml import etree  # type: ignore[import-untyped]  # no stubs in the pinned set
from signxml.algorithms import CanonicalizationMethod, DigestAlgorithm, SignatureMethod
from signxml.signer import XMLSigner

from tdllm_attest.clock import require_aware
from tdllm_attest.gpu import abi
from tdllm_attest.gpu.anchors import GpuAnchors, simulated_gpu_anchors
from tdllm_attest.gpu.evidence import ARCH_HOPPER, GpuEvidence
from tdllm_attest.gpu.rim import SHA384_NS, SWID_NS
from tdllm_attest.trust import MODE_SIMULATED

UNSAFE_GPU_DEVICE_ROOT_CN = "TDLLM UNSAFE TEST GPU DEVICE ROOT - SIMULATED ONLY"
UNSAFE_GPU_RIM_ROOT_CN = "TDLLM UNSAFE TEST GPU RIM ROOT - SIMULATED ONLY"
MEASUREMENT_COUNT = 64
# Which golden indexes each RIM sets (disjoint, as NVIDIA's are); 35 is NVDEC0's.
VBIOS_ACTIVE = frozenset(range(0, 16))
DRIVER_ACTIVE = frozenset(range(16, 40))
DEFAULT_DRIVER_VERSION = "550.90.07"
DEFAULT_VBIOS_VERSION = "96.00.9f.00.01"
DEFAULT_BOARD = ("0000", "0000", "000")  # project, project SKU, chip SKU
RimKind = Literal["driver", "vbios"]
_LIFETIME = timedelta(days=365)
_BACKDATE = timedelta(hours=1)
_HALF = abi.SIGNATURE_SIZE // 2
_FWID_OID = x509.ObjectIdentifier("2.23.133.5.4.1")
_FEATURE_CODES = {name: code for code, name in abi.FEATURE_FLAGS.items()}


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TDLLM UNSAFE TEST PKI"),
        ]
    )


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    encoded = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(encoded)]) + encoded + content


def fwid_extension(public_key: ec.EllipticCurvePublicKey, fwid: bytes) -> bytes:
    """DER of a Hopper-shaped FWID extension: SEQUENCE { 1, SPKI, SEQUENCE { sha384, fwid } }."""
    spki = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    sha384 = _der(0x06, bytes.fromhex("608648016503040202"))
    return _der(0x30, _der(0x02, b"\x01") + spki + _der(0x30, sha384 + _der(0x04, fwid)))


@dataclass(frozen=True)
class _Issued:
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    cert: x509.Certificate

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(Encoding.DER)


def _issue(
    cn: str,
    now: datetime,
    issuer: _Issued | None,
    *,
    ca: bool,
    fwid: bytes | None = None,
) -> _Issued:
    """A P-384 certificate; a leaf (not `ca`) may sign, and carries the FWID extension if given."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = _name(cn)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _LIFETIME)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
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
    )
    if fwid is not None:
        value = fwid_extension(key.public_key(), fwid)
        builder = builder.add_extension(
            x509.UnrecognizedExtension(_FWID_OID, value), critical=False
        )
    signer = issuer.key if issuer else key
    return _Issued(key, builder.sign(signer, hashes.SHA384()))


@dataclass(frozen=True)
class _Roots:
    """The two test roots (and the RIM signer): shared by sibling GPUs of one test platform."""

    device_root: _Issued
    device_identity: _Issued
    device_provisioner: _Issued
    rim_root: _Issued
    rim_signer: _Issued

    @classmethod
    def generate(cls, now: datetime) -> _Roots:
        device_root = _issue(UNSAFE_GPU_DEVICE_ROOT_CN, now, None, ca=True)
        identity = _issue("TDLLM UNSAFE TEST GPU IDENTITY CA", now, device_root, ca=True)
        provisioner = _issue("TDLLM UNSAFE TEST GPU PROVISIONER CA", now, identity, ca=True)
        rim_root = _issue(UNSAFE_GPU_RIM_ROOT_CN, now, None, ca=True)
        signer = _issue("TDLLM UNSAFE TEST GPU RIM SIGNER", now, rim_root, ca=False)
        return cls(device_root, identity, provisioner, rim_root, signer)


def _measurement(index: int, kind: str, version: str) -> bytes:
    return hashlib.sha384(f"tdllm synthetic GPU {kind} {version} index {index}".encode()).digest()


def _vbios_bytes(version: str) -> bytes:
    g = [int(part, 16) for part in version.split(".")]
    if len(g) != 5:
        raise ValueError(f"VBIOS version {version!r} is not five hex groups")
    return bytes([g[3], g[2], g[1], g[0], g[4], 0, 0, 0])


def _ascii(text: str, size: int) -> bytes:
    return text.encode("ascii").ljust(size, b"\0")


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("<HH", kind, len(value)) + value


@dataclass(frozen=True)
class Tamper:
    """Ways to spoil a synthetic report, for attack tests; the defaults spoil nothing.

    `measurements`: SPDM block index -> value to report instead; `report_fwid`: an FWID other than
    the leaf certificate's; `feature_flag`: another mode (None: omit the TLV); `driver_version` /
    `vbios_version`: other versions to state; `signing_key`: sign with a key other than the leaf's;
    `opaque_suffix`: raw bytes appended to the opaque data (malformed TLVs, still signed).
    """

    measurements: Mapping[int, bytes] = field(default_factory=dict)
    report_fwid: bytes | None = None
    feature_flag: str | Literal["default"] | None = "default"
    driver_version: str | None = None
    vbios_version: str | None = None
    signing_key: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)
    opaque_suffix: bytes = b""


class SyntheticGpu:
    """UNSAFE: a fake Hopper GPU + fake NVIDIA PKIs, generated in memory at `now`.

    `measurements` are the report's SPDM blocks 1..64 (block i = golden index i - 1); RIMs made by
    `rim_xml` carry them as golden values, so an untampered `collect` passes `appraise_gpu`.
    Certificates are valid from `now` minus an hour to a year after `now`.
    """

    def __init__(
        self,
        now: datetime,
        *,
        driver_version: str = DEFAULT_DRIVER_VERSION,
        vbios_version: str = DEFAULT_VBIOS_VERSION,
        feature_flag: str | None = "SPT",
        nvdec0_disabled: bool = False,
        board: tuple[str, str, str] = DEFAULT_BOARD,
        _roots: _Roots | None = None,
    ) -> None:
        self.now = require_aware(now)
        self.driver_version = driver_version
        self.vbios_version = vbios_version.lower()
        self.feature_flag = feature_flag
        self.nvdec0_disabled = nvdec0_disabled
        self.board = board
        self._roots = _roots or _Roots.generate(self.now)
        self.fwid = os.urandom(abi.FWID_SIZE)
        self._brom = _issue(
            "TDLLM UNSAFE TEST GPU BROM", self.now, self._roots.device_provisioner, ca=True
        )
        self._leaf = _issue(
            "TDLLM UNSAFE TEST GPU FMC LEAF",
            self.now,
            self._brom,
            ca=False,
            fwid=self.fwid,
        )
        self.golden: dict[int, bytes] = {}
        for index in range(MEASUREMENT_COUNT):
            if index in DRIVER_ACTIVE:
                self.golden[index] = _measurement(index, "driver", driver_version)
            elif index in VBIOS_ACTIVE:
                self.golden[index] = _measurement(index, "vbios", self.vbios_version)
        self.measurements = {
            i + 1: self.golden.get(i, bytes(abi.FWID_SIZE)) for i in range(MEASUREMENT_COUNT)
        }
        if nvdec0_disabled:  # NVDEC0's firmware is not loaded: its block cannot match
            self.measurements[36] = bytes(abi.FWID_SIZE)

    def sibling(
        self,
        *,
        driver_version: str | None = None,
        vbios_version: str | None = None,
        feature_flag: str | Literal["same"] | None = "same",
        nvdec0_disabled: bool | None = None,
        board: tuple[str, str, str] | None = None,
    ) -> SyntheticGpu:
        """Another GPU (own BROM, leaf, FWID) under the same two test roots; unset: the same."""
        return SyntheticGpu(
            self.now,
            driver_version=driver_version or self.driver_version,
            vbios_version=vbios_version or self.vbios_version,
            feature_flag=self.feature_flag if feature_flag == "same" else feature_flag,
            nvdec0_disabled=self.nvdec0_disabled if nvdec0_disabled is None else nvdec0_disabled,
            board=board or self.board,
            _roots=self._roots,
        )

    # -- anchors ------------------------------------------------------------------------------

    @property
    def device_root_der(self) -> bytes:
        return self._roots.device_root.der

    @property
    def rim_root_der(self) -> bytes:
        return self._roots.rim_root.der

    def anchors(
        self, *, mode: str = MODE_SIMULATED, environ: Mapping[str, str] | None = None
    ) -> GpuAnchors:
        """The test anchors, through the simulated gate (`environ` defaults to os.environ)."""
        return simulated_gpu_anchors(
            self.device_root_der,
            self.rim_root_der,
            mode=mode,
            environ=os.environ if environ is None else environ,
        )

    # -- evidence -----------------------------------------------------------------------------

    def certificate_chain(self) -> tuple[bytes, ...]:
        """DER, leaf first: leaf, BROM, provisioner CA, identity CA, root."""
        r = self._roots
        return (
            self._leaf.der,
            self._brom.der,
            r.device_provisioner.der,
            r.device_identity.der,
            r.device_root.der,
        )

    def _opaque(self, fwid: bytes, feature_flag: str | None, driver: str, vbios: str) -> bytes:
        project, project_sku, chip_sku = self.board
        fields = [
            _tlv(abi.OPAQUE_DRIVER_VERSION, driver.encode("ascii") + b"\0"),
            _tlv(abi.OPAQUE_VBIOS_VERSION, _vbios_bytes(vbios)),
            _tlv(abi.OPAQUE_CHIP_SKU, _ascii(chip_sku, 9)),
            _tlv(abi.OPAQUE_PROJECT, _ascii(project, 5)),
            _tlv(abi.OPAQUE_PROJECT_SKU, _ascii(project_sku, 5)),
            _tlv(abi.OPAQUE_FWID, fwid),
            _tlv(
                abi.OPAQUE_NVDEC0_STATUS,
                bytes([abi.NVDEC0_DISABLED if self.nvdec0_disabled else abi.NVDEC0_ENABLED]),
            ),
        ]
        if feature_flag is not None:
            fields.append(_tlv(abi.OPAQUE_OPAQUE_DATA_VERSION, struct.pack("<I", 1)))
            fields.append(
                _tlv(abi.OPAQUE_FEATURE_FLAG, struct.pack("<I", _FEATURE_CODES[feature_flag]))
            )
        return b"".join(fields)

    def report(self, nonce: bytes, *, tamper: Tamper | None = None) -> bytes:
        """A signed request||response for `nonce`; `tamper` changes the report (never the RIMs)."""
        if len(nonce) != abi.NONCE_SIZE:
            raise ValueError(f"nonce must be {abi.NONCE_SIZE} bytes")
        t = tamper or Tamper()
        blocks = {**self.measurements, **t.measurements}
        record = b"".join(
            struct.pack("<BBH", index, abi.MEASUREMENT_SPEC_DMTF, abi.DMTF_HEADER_SIZE + len(v))
            + struct.pack("<BH", 0x01, len(v))
            + v
            for index, v in sorted(blocks.items())
        )
        opaque = (
            self._opaque(
                self.fwid if t.report_fwid is None else t.report_fwid,
                self.feature_flag if t.feature_flag == "default" else t.feature_flag,
                t.driver_version or self.driver_version,
                t.vbios_version or self.vbios_version,
            )
            + t.opaque_suffix
        )
        request = bytes([abi.SPDM_VERSION_11, abi.GET_MEASUREMENTS, 0x01, 0xFF]) + nonce + b"\0"
        response = (
            bytes([abi.SPDM_VERSION_11, abi.MEASUREMENTS, 0, 0, len(blocks)])
            + len(record).to_bytes(3, "little")
            + record
            + os.urandom(abi.NONCE_SIZE)
            + struct.pack("<H", len(opaque))
            + opaque
        )
        key = t.signing_key or self._leaf.key
        r, s = decode_dss_signature(key.sign(request + response, ec.ECDSA(hashes.SHA384())))
        return request + response + r.to_bytes(_HALF, "big") + s.to_bytes(_HALF, "big")

    def collect(self, nonce: bytes, *, tamper: Tamper | None = None) -> GpuEvidence:
        """The evidence a guest would collect for `nonce` (optionally tampered with)."""
        return GpuEvidence(
            arch=ARCH_HOPPER,
            report=self.report(nonce, tamper=tamper),
            certificate_chain=self.certificate_chain(),
        )

    # -- RIMs ---------------------------------------------------------------------------------

    def rim_xml(
        self,
        kind: RimKind,
        *,
        version: str | None = None,
        golden: Mapping[int, bytes] | None = None,
        signer: ec.EllipticCurvePrivateKey | None = None,
    ) -> bytes:
        """A signed RIM in NVIDIA's shape; `golden` overrides values, `signer` signs with another
        key (the embedded chain stays the test signer's)."""
        active = DRIVER_ACTIVE if kind == "driver" else VBIOS_ACTIVE
        version = version or (self.driver_version if kind == "driver" else self.vbios_version)
        values = {**self.golden, **(golden or {})}
        return _sign_rim(
            _rim_document(kind, version, active, values),
            key=signer or self._roots.rim_signer.key,
            chain=(self._roots.rim_signer.cert, self._roots.rim_root.cert),
        )

    def rim_file_names(self) -> dict[RimKind, str]:
        """NVIDIA-style file names (the VBIOS one carries the board identity)."""
        project, project_sku, chip_sku = self.board
        vbios = self.vbios_version.replace(".", "").upper()
        return {
            "driver": f"NV_GPU_DRIVER_GH100_{self.driver_version}.swidtag",
            "vbios": f"{project}_{project_sku}_{chip_sku}_{vbios}_UNSAFE_TEST.swidtag",
        }

    def write_rims(self, directory: str | Path) -> list[Path]:
        """Write this GPU's driver and VBIOS RIMs into `directory` (a `RimStore` directory)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for kind, name in self.rim_file_names().items():
            path = out / name
            path.write_bytes(self.rim_xml(kind))
            paths.append(path)
        return paths


def _rim_document(
    kind: str, version: str, active: frozenset[int], values: Mapping[int, bytes]
) -> etree._Element:
    nsmap = {None: SWID_NS, "ns0": SWID_NS, "ns2": SHA384_NS}
    root = etree.Element(f"{{{SWID_NS}}}SoftwareIdentity", nsmap=nsmap)
    root.set("name", "GH100")
    root.set("tagId", hashlib.sha384(f"tdllm unsafe test {kind} {version}".encode()).hexdigest())
    root.set("version", "1.0")
    entity = etree.SubElement(root, f"{{{SWID_NS}}}Entity")
    entity.set("name", "TDLLM UNSAFE TEST")
    entity.set("role", "softwareCreator tagCreator")
    meta = etree.SubElement(root, f"{{{SWID_NS}}}Meta")
    meta.set("colloquialVersion", version.upper() if kind == "vbios" else version)
    meta.set("product", "GH100")
    meta.set("edition", "UNSAFE TEST")
    payload = etree.SubElement(root, f"{{{SWID_NS}}}Payload")
    for index in range(MEASUREMENT_COUNT):
        resource = etree.SubElement(payload, f"{{{SWID_NS}}}Resource")
        resource.set("type", "Measurement")
        resource.set("index", str(index))
        resource.set("active", "True" if index in active else "False")
        resource.set("alternatives", "1")
        resource.set(f"{{{SHA384_NS}}}Hash0", values.get(index, bytes(abi.FWID_SIZE)).hex())
        resource.set("name", f"Measurement_{index}")
        resource.set("size", str(abi.FWID_SIZE))
    return root


def _sign_rim(
    document: etree._Element,
    *,
    key: ec.EllipticCurvePrivateKey,
    chain: tuple[x509.Certificate, ...],
) -> bytes:
    signer = XMLSigner(
        signature_algorithm=SignatureMethod.ECDSA_SHA384,
        digest_algorithm=DigestAlgorithm.SHA384,
        c14n_algorithm=CanonicalizationMethod.CANONICAL_XML_1_1,
    )
    signed = signer.sign(document, key=key, cert=list(chain))
    out: bytes = etree.tostring(signed, xml_declaration=False)
    return out


__all__ = ["SyntheticGpu", "Tamper", "fwid_extension"]
