"""NVIDIA's reference values (RIMs): SWID-tag XML with golden measurements, XMLDSig-signed.

`parse_rim` reads the structure only (strict: one Meta, one Payload, each Resource with a decimal
index, an "active" flag and 1..N SHA-384 alternatives of the declared size). `verify_rim` also
checks, at `now`: the signing chain embedded in the XML up to the pinned RIM root (never the root
the XML carries), then the enveloped signature (signxml, ECDSA-SHA384 + SHA-384 only) under that
chain's leaf, and returns the values read from the part that was actually signed.

The XML is untrusted input: capped at 1 MiB, parsed with entities unresolved, no DTD and no
network; a document type declaration or an entity anywhere is refused. Revocation of the RIM
signing certificates (NVIDIA's OCSP) is NOT checked. `RimStore` holds the RIM files the broker
serves (like Intel collateral from a PCCS); lookups return bytes, which `verify_rim` judges.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from cryptography import x509
from lxml import etree  # type: ignore[import-untyped]  # no stubs in the pinned set
from signxml.algorithms import DigestAlgorithm, SignatureMethod
from signxml.exceptions import SignXMLException
from signxml.verifier import SignatureConfiguration, XMLVerifier

from tdllm_attest import memo
from tdllm_attest.clock import require_aware
from tdllm_attest.errors import GpuEvidenceError, GpuPolicyError
from tdllm_attest.gpu.certs import load_der_chain, require_digital_signature, verify_chain

SWID_NS = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
DSIG_NS = "http://www.w3.org/2000/09/xmldsig#"
SHA384_NS = "http://www.w3.org/2001/04/xmlenc#sha384"
MAX_RIM_SIZE = 1024 * 1024
MAX_STORE_FILES = 4096
MAX_MEASUREMENTS = 256
MAX_ALTERNATIVES = 64
MAX_RIM_CHAIN = 8
DIGEST_SIZE = 48  # SHA-384
RimKind = Literal["driver", "vbios"]

# "96.00.5E.00.01" (VBIOS) vs "550.90.07" (driver): NVIDIA's RIMs do not say which they are.
_VBIOS_VERSION = re.compile(r"[0-9a-f]{2}(?:\.[0-9a-f]{2}){4}")
_DRIVER_VERSION = re.compile(r"[0-9]{1,4}(?:\.[0-9]{1,4}){1,3}")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,3}")
_HASH_ATTR = re.compile(r"Hash([0-9]+)")
_HEX = re.compile(r"[0-9a-fA-F]*")
# NVIDIA names VBIOS RIM files project_projectsku_chipsku_VERSION_...: the only place the
# board identity appears (the signed XML does not carry it).
_VBIOS_FILE = re.compile(r"([0-9a-z]+)_([0-9a-z]+)_([0-9a-z]+)_[0-9a-f]{10}(?:_.*)?\.swidtag")
_SIGNATURE_CONFIG_METHODS = frozenset({SignatureMethod.ECDSA_SHA384})
_SIGNATURE_CONFIG_DIGESTS = frozenset({DigestAlgorithm.SHA384})


def _swid(tag: str) -> str:
    return f"{{{SWID_NS}}}{tag}"


def _dsig(tag: str) -> str:
    return f"{{{DSIG_NS}}}{tag}"


@dataclass(frozen=True)
class GoldenMeasurement:
    """The reference value(s) for one measurement index; only active ones are compared."""

    index: int  # NVIDIA's 0-based index: it describes SPDM measurement block index + 1
    name: str
    size: int
    active: bool
    alternatives: frozenset[bytes]


@dataclass(frozen=True)
class Rim:
    """A parsed RIM: `version` lower-case (as NVIDIA compares it), chain DER leaf first."""

    rim_id: str
    kind: RimKind
    version: str
    product: str
    measurements: dict[int, GoldenMeasurement]
    certificate_chain: tuple[bytes, ...]


def _parser() -> etree.XMLParser:
    # No entity expansion, no DTD loading, no network, no huge-tree allowances.
    return etree.XMLParser(
        resolve_entities=False,
        load_dtd=False,
        dtd_validation=False,
        no_network=True,
        huge_tree=False,
    )


def _parse_xml(xml: bytes) -> etree._Element:
    if not isinstance(xml, bytes):
        raise GpuEvidenceError(f"RIM must be bytes, not {type(xml).__name__}")
    if len(xml) > MAX_RIM_SIZE:
        raise GpuEvidenceError(f"RIM has {len(xml)} bytes, at most {MAX_RIM_SIZE}")
    try:
        root = etree.fromstring(xml, parser=_parser())
    except etree.XMLSyntaxError as exc:
        raise GpuEvidenceError(f"RIM is not well-formed XML: {exc}") from None
    info = etree.ElementTree(root).docinfo
    if info.doctype or info.internalDTD is not None or info.externalDTD is not None:
        raise GpuEvidenceError("RIM carries a document type declaration (refused: XXE)")
    if any(True for _ in root.iter(etree.Entity)):
        raise GpuEvidenceError("RIM carries an entity reference (refused: XXE)")
    return root


def _one(parent: etree._Element, tag: str, what: str) -> etree._Element:
    found = [child for child in parent if child.tag == tag]
    if len(found) != 1:
        raise GpuEvidenceError(f"RIM must have exactly one {what}, has {len(found)}")
    return found[0]


def _decimal(value: str | None, what: str, maximum: int) -> int:
    if value is None or _DECIMAL.fullmatch(value) is None or int(value) > maximum:
        raise GpuEvidenceError(f"RIM {what} {value!r} is not a decimal 0..{maximum}")
    return int(value)


def _measurement(resource: etree._Element) -> GoldenMeasurement:
    if resource.tag != _swid("Resource") or resource.get("type") != "Measurement":
        raise GpuEvidenceError(f"RIM Payload holds {resource.tag!r}, not a Measurement Resource")
    index = _decimal(resource.get("index"), "measurement index", MAX_MEASUREMENTS - 1)
    active = resource.get("active")
    if active not in ("True", "False"):
        raise GpuEvidenceError(f"RIM measurement {index}: active is {active!r}")
    count = _decimal(resource.get("alternatives"), f"measurement {index} alternatives", 64)
    size = _decimal(resource.get("size"), f"measurement {index} size", DIGEST_SIZE)
    if count == 0 or size != DIGEST_SIZE:
        raise GpuEvidenceError(f"RIM measurement {index}: needs 1+ SHA-384 alternatives")
    hashes = {}
    for name, value in resource.attrib.items():
        qname = etree.QName(name)
        match = _HASH_ATTR.fullmatch(qname.localname)
        if match is None:
            continue
        if qname.namespace != SHA384_NS or _HEX.fullmatch(value) is None or len(value) != 2 * size:
            raise GpuEvidenceError(f"RIM measurement {index}: {name} is not a SHA-384 hex value")
        hashes[int(match.group(1))] = bytes.fromhex(value)
    if sorted(hashes) != list(range(count)):
        raise GpuEvidenceError(f"RIM measurement {index}: Hash0..Hash{count - 1} expected")
    return GoldenMeasurement(
        index=index,
        name=resource.get("name", ""),
        size=size,
        active=active == "True",
        alternatives=frozenset(hashes.values()),
    )


def _certificate_chain(root: etree._Element) -> tuple[bytes, ...]:
    signature = _one(root, _dsig("Signature"), "ds:Signature")
    key_info = _one(signature, _dsig("KeyInfo"), "ds:KeyInfo")
    x509_data = _one(key_info, _dsig("X509Data"), "ds:X509Data")
    texts = [c.text or "" for c in x509_data if c.tag == _dsig("X509Certificate")]
    if not 0 < len(texts) <= MAX_RIM_CHAIN:
        raise GpuEvidenceError(f"RIM must embed 1..{MAX_RIM_CHAIN} certificates")
    try:
        return tuple(base64.b64decode("".join(t.split()), validate=True) for t in texts)
    except (binascii.Error, ValueError):
        raise GpuEvidenceError("RIM certificate is not base64") from None


def _rim(signed: etree._Element, chain: tuple[bytes, ...]) -> Rim:
    if signed.tag != _swid("SoftwareIdentity"):
        raise GpuEvidenceError(f"RIM root element is {signed.tag!r}, not a SWID SoftwareIdentity")
    allowed = {_swid("Entity"), _swid("Meta"), _swid("Payload"), _dsig("Signature")}
    strays = {str(child.tag) for child in signed if child.tag not in allowed}
    if strays:
        raise GpuEvidenceError(f"RIM has unexpected elements {sorted(strays)}")
    meta = _one(signed, _swid("Meta"), "Meta")
    version = (meta.get("colloquialVersion") or "").lower()
    kind: RimKind
    if _VBIOS_VERSION.fullmatch(version):
        kind = "vbios"
    elif _DRIVER_VERSION.fullmatch(version):
        kind = "driver"
    else:
        raise GpuEvidenceError(f"RIM version {version!r} is neither a driver nor a VBIOS version")
    rim_id = signed.get("tagId") or ""
    if not rim_id:
        raise GpuEvidenceError("RIM has no tagId")
    measurements: dict[int, GoldenMeasurement] = {}
    for resource in _one(signed, _swid("Payload"), "Payload"):
        golden = _measurement(resource)
        if golden.index in measurements:
            raise GpuEvidenceError(f"RIM measurement index {golden.index} appears twice")
        measurements[golden.index] = golden
    if not measurements:
        raise GpuEvidenceError("RIM holds no measurements")
    return Rim(
        rim_id=rim_id,
        kind=kind,
        version=version,
        product=meta.get("product", ""),
        measurements=measurements,
        certificate_chain=chain,
    )


def parse_rim(xml: bytes) -> Rim:
    """Parse a RIM WITHOUT checking its signature (use `verify_rim` for anything trusted)."""
    root = _parse_xml(xml)
    return _rim(root, _certificate_chain(root))


def verify_rim(xml: bytes, *, root: x509.Certificate, now: datetime) -> Rim:
    """Verify a RIM's chain up to the pinned `root` and its signature at `now`; `GpuEvidenceError`
    on any failure. The values come from the signed content only."""
    now = require_aware(now)
    document = _parse_xml(xml)
    chain_der = _certificate_chain(document)
    certs = load_der_chain(chain_der, "RIM signing chain")
    root_der = memo.der_of(root)
    last = certs[-1]
    # NVIDIA's RIMs embed their root; one without it gets the pinned root appended. Any other
    # root ends the chain in something that is not the anchor, and `verify_chain` says so.
    if memo.der_of(last) != root_der and last.subject != last.issuer:
        certs.append(root)
    verify_chain(certs, root_der, now, what="RIM signing chain")
    require_digital_signature(certs[0], "RIM signing chain")
    config = SignatureConfiguration(
        require_x509=True,
        location="./",  # enveloped, a child of the root element
        expect_references=1,
        signature_methods=_SIGNATURE_CONFIG_METHODS,
        digest_algorithms=_SIGNATURE_CONFIG_DIGESTS,
        verification_time=now,
    )
    try:
        result = XMLVerifier().verify(
            xml, x509_cert=certs[0], parser=_parser(), expect_config=config
        )
    except (SignXMLException, etree.LxmlError, ValueError) as exc:
        raise GpuEvidenceError(f"RIM signature does not verify: {exc}") from None
    signed = getattr(result, "signed_xml", None)
    if signed is None:
        raise GpuEvidenceError("RIM signature covers no XML element")
    return _rim(signed, chain_der)


@dataclass(frozen=True)
class _Entry:
    name: str
    xml: bytes
    kind: RimKind
    version: str
    board: tuple[str, str, str] | None  # (project, project SKU, chip SKU) from a VBIOS file name


class RimStore:
    """The RIM files at hand, indexed by kind and version (unverified: `verify_rim` judges)."""

    def __init__(self, rims: Mapping[str, bytes]) -> None:
        if len(rims) > MAX_STORE_FILES:
            raise GpuEvidenceError(f"RIM store holds more than {MAX_STORE_FILES} files")
        self._entries: list[_Entry] = []
        for name, xml in sorted(rims.items()):
            try:
                rim = parse_rim(xml)
            except GpuEvidenceError as exc:
                raise GpuEvidenceError(f"RIM store: {name}: {exc}") from None
            match = _VBIOS_FILE.fullmatch(name.lower())
            board = (match.group(1), match.group(2), match.group(3)) if match else None
            self._entries.append(_Entry(name, xml, rim.kind, rim.version, board))

    @classmethod
    def from_directory(cls, directory: str | Path) -> RimStore:
        """Every `*.swidtag` file in `directory` (not recursive)."""
        rims: dict[str, bytes] = {}
        for path in sorted(Path(directory).glob("*.swidtag")):
            if path.stat().st_size > MAX_RIM_SIZE:
                raise GpuEvidenceError(f"RIM store: {path.name} exceeds {MAX_RIM_SIZE} bytes")
            rims[path.name] = path.read_bytes()
            if len(rims) > MAX_STORE_FILES:
                raise GpuEvidenceError(f"RIM store holds more than {MAX_STORE_FILES} files")
        return cls(rims)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(e.name for e in self._entries)

    def versions(self, kind: RimKind) -> frozenset[str]:
        return frozenset(e.version for e in self._entries if e.kind == kind)

    def _one(self, candidates: list[_Entry], what: str) -> bytes:
        if not candidates:
            raise GpuPolicyError(f"the RIM store has no {what}")
        if len(candidates) > 1:
            names = ", ".join(e.name for e in candidates)
            raise GpuPolicyError(f"the RIM store has several {what}: {names}")
        return candidates[0].xml

    def driver_rim(self, version: str) -> bytes:
        """The one driver RIM for `version`; `GpuPolicyError` when none or several."""
        version = version.lower()
        found = [e for e in self._entries if e.kind == "driver" and e.version == version]
        return self._one(found, f"driver RIM for {version}")

    def vbios_rim(
        self, version: str, *, project: str = "", project_sku: str = "", chip_sku: str = ""
    ) -> bytes:
        """The one VBIOS RIM for `version` and this board (files named otherwise match any)."""
        version = version.lower()
        board = (project.lower(), project_sku.lower(), chip_sku.lower())
        found = [
            e
            for e in self._entries
            if e.kind == "vbios" and e.version == version and e.board in (None, board)
        ]
        return self._one(found, f"VBIOS RIM for {version} (board {'/'.join(board)})")
