"""The GPU verifier against a synthetic Hopper (UNSAFE test PKIs, tdllm_attest.testing.gpu).

The synthetic GPU passes the same checks as a real one with only the anchors changed, so every
attack here is a correctly signed piece of evidence (or RIM) that must still be refused, with the
error class and the one-line cause it must be refused with. The PKIs are generated once per module.
"""

from __future__ import annotations

import dataclasses
import os
import random
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tdllm_attest.errors import GpuEvidenceError, GpuPolicyError
from tdllm_attest.gpu import abi
from tdllm_attest.gpu.anchors import (
    GpuAnchors,
    nvidia_anchors,
    select_gpu_anchors,
    simulated_gpu_anchors,
)
from tdllm_attest.gpu.evidence import GpuEvidence, evidence_digest
from tdllm_attest.gpu.policy import GpuAppraisal, GpuPolicy, appraise_gpu
from tdllm_attest.gpu.rim import RimStore, parse_rim, verify_rim
from tdllm_attest.gpu.verify import verify_evidence
from tdllm_attest.testing.gpu import RimKind, SyntheticGpu, Tamper
from tdllm_attest.trust import SimulationRefused
from tdllm_attest.wire import b64url, canonical_json

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ALLOW = {"TDLLM_ALLOW_SIMULATED_TDX": "1"}
NONCE = bytes(range(32))

pytestmark = pytest.mark.usefixtures("quiet_simulated_warnings")


@pytest.fixture(scope="module")
def gpu() -> SyntheticGpu:
    return SyntheticGpu(NOW)


@pytest.fixture(scope="module")
def anchors(gpu: SyntheticGpu) -> GpuAnchors:
    return gpu.anchors(environ=ALLOW)


@pytest.fixture(scope="module")
def rims(gpu: SyntheticGpu, tmp_path_factory: pytest.TempPathFactory) -> RimStore:
    directory = tmp_path_factory.mktemp("rims")
    gpu.write_rims(directory)
    return RimStore.from_directory(directory)


def _appraise(
    evidences: list[GpuEvidence],
    rims: RimStore,
    anchors: GpuAnchors,
    *,
    nonce: bytes = NONCE,
    policy: GpuPolicy | None = None,
    now: datetime = NOW,
) -> list[GpuAppraisal]:
    return appraise_gpu(
        evidences, nonce=nonce, rims=rims, policy=policy or GpuPolicy(), anchors=anchors, now=now
    )


def _store(*entries: tuple[SyntheticGpu, RimKind, bytes]) -> RimStore:
    """A store of RIM files named as `write_rims` names them."""
    return RimStore({gpu.rim_file_names()[kind]: xml for gpu, kind, xml in entries})


# -- what is accepted ------------------------------------------------------------------------


def test_two_synthetic_gpus_pass_the_whole_appraisal(
    gpu: SyntheticGpu, rims: RimStore, anchors: GpuAnchors
) -> None:
    second = gpu.sibling()
    appraisals = _appraise([gpu.collect(NONCE), second.collect(NONCE)], rims, anchors)
    assert [a.index for a in appraisals] == [0, 1]
    summary = appraisals[1].summary()
    assert canonical_json(summary)  # JSON-able for audit logs
    assert summary["fwid"] == second.fwid.hex() and summary["simulated"] is True
    assert (summary["driver"], summary["vbios"]) == ("550.90.07", "96.00.9f.00.01")
    assert summary["measurements_matched"] == 40 and summary["measurements_skipped"] == []


def test_nvdec0_disabled_skips_its_measurement_as_nvidia_does(
    gpu: SyntheticGpu, rims: RimStore, anchors: GpuAnchors
) -> None:
    disabled = gpu.sibling(nvdec0_disabled=True)
    (appraisal,) = _appraise([disabled.collect(NONCE)], rims, anchors)
    assert appraisal.matched == 39 and appraisal.skipped == (35,)


def test_evidence_json_round_trips_and_its_digest_depends_on_order(gpu: SyntheticGpu) -> None:
    first, second = gpu.collect(NONCE), gpu.sibling().collect(NONCE)
    assert GpuEvidence.from_json(first.to_json()) == first
    assert evidence_digest([first, second]) == evidence_digest([first, second])
    assert evidence_digest([first, second]) != evidence_digest([second, first])
    assert len(evidence_digest([])) == 64


# -- attacks on the report -------------------------------------------------------------------


def test_a_measurement_that_matches_no_alternative_is_refused(
    gpu: SyntheticGpu, rims: RimStore, anchors: GpuAnchors
) -> None:
    # Block 18 is golden index 17, a driver measurement; block 3 is index 2, a VBIOS one.
    tampered = gpu.collect(NONCE, tamper=Tamper(measurements={18: b"\x01" * 48, 3: bytes(48)}))
    with pytest.raises(GpuPolicyError) as refused:
        _appraise([tampered], rims, anchors)
    assert str(refused.value) == (
        "GPU 0: measurements differ from the RIMs at index 2 (vbios), 17 (driver)"
    )


def test_a_report_signed_by_another_key_is_refused(
    gpu: SyntheticGpu, rims: RimStore, anchors: GpuAnchors
) -> None:
    other = ec.generate_private_key(ec.SECP384R1())
    forged = gpu.collect(NONCE, tamper=Tamper(signing_key=other))
    with pytest.raises(GpuEvidenceError, match="GPU 0: GPU report: signature does not verify"):
        _appraise([forged], rims, anchors)


def test_a_report_with_another_fwid_than_its_leaf_is_refused(
    gpu: SyntheticGpu, anchors: GpuAnchors
) -> None:
    forged = gpu.collect(NONCE, tamper=Tamper(report_fwid=os.urandom(48)))
    with pytest.raises(GpuEvidenceError, match=r"FWID .* differs from the leaf's"):
        verify_evidence(forged, anchors=anchors, now=NOW)


def test_a_report_for_another_nonce_is_refused(
    gpu: SyntheticGpu, rims: RimStore, anchors: GpuAnchors
) -> None:
    replayed = gpu.collect(bytes(32))
    with pytest.raises(GpuEvidenceError, match="GPU 0: the report answers another nonce"):
        _appraise([replayed], rims, anchors)
    with pytest.raises(GpuPolicyError, match="nonce must be 32 bytes"):
        _appraise([gpu.collect(NONCE)], rims, anchors, nonce=NONCE[:16])


def test_the_second_gpu_is_named_when_it_fails(
    gpu: SyntheticGpu, rims: RimStore, anchors: GpuAnchors
) -> None:
    with pytest.raises(GpuEvidenceError, match=r"^GPU 1: the report answers another nonce"):
        _appraise([gpu.collect(NONCE), gpu.sibling().collect(bytes(32))], rims, anchors)


def test_the_same_gpu_twice_is_refused(
    gpu: SyntheticGpu, rims: RimStore, anchors: GpuAnchors
) -> None:
    with pytest.raises(GpuPolicyError, match="GPU 1: the same device as GPU 0"):
        _appraise([gpu.collect(NONCE), gpu.collect(NONCE)], rims, anchors)


def test_an_empty_evidence_list_is_refused(rims: RimStore, anchors: GpuAnchors) -> None:
    with pytest.raises(GpuPolicyError, match="no GPU evidence"):
        _appraise([], rims, anchors)


def test_an_expired_device_chain_is_refused(
    gpu: SyntheticGpu, rims: RimStore, anchors: GpuAnchors
) -> None:
    with pytest.raises(GpuEvidenceError, match=r"GPU 0: GPU device chain: .* is not valid at"):
        _appraise([gpu.collect(NONCE)], rims, anchors, now=NOW + timedelta(days=366))


@pytest.mark.parametrize(
    ("suffix", "cause"),
    [
        (struct.pack("<HH", 99, 1) + b"\0", "unknown opaque data type 99"),
        (struct.pack("<HH", abi.OPAQUE_DRIVER_VERSION, 2) + b"1\0", "type 3 appears twice"),
        (struct.pack("<HH", abi.OPAQUE_PROTECTED_PCIE_STATUS, 2) + b"UU", "21 has 2 bytes"),
        (struct.pack("<HH", abi.OPAQUE_MSRSCNT, 3) + b"\0" * 3, "not whole u32s"),
        (struct.pack("<HH", abi.OPAQUE_CPRINFO, 9) + b"\0", "truncated"),
    ],
)
def test_malformed_opaque_data_is_refused_even_when_signed(
    gpu: SyntheticGpu, anchors: GpuAnchors, suffix: bytes, cause: str
) -> None:
    forged = gpu.collect(NONCE, tamper=Tamper(opaque_suffix=suffix))
    with pytest.raises(GpuEvidenceError, match=cause):
        verify_evidence(forged, anchors=anchors, now=NOW)


@pytest.mark.parametrize(
    ("offset", "value", "cause"),
    [
        (0, 0x12, "request SPDM version"),
        (1, 0xE1, "request code"),
        (2, 0x00, r"param1 \(signature\)"),
        (37, 0x10, "response SPDM version"),
        (38, 0x7F, "response code"),
        (41, 65, "needs .* bytes"),  # claims one block more than the record holds
        (45 + 55, 1, "block 1 where block 2 belongs"),  # a duplicate index
        (46, 0x02, "block 1 spec"),
    ],
)
def test_wrong_spdm_framing_is_refused(
    gpu: SyntheticGpu, offset: int, value: int, cause: str
) -> None:
    raw = bytearray(gpu.report(NONCE))
    raw[offset] = value
    with pytest.raises(GpuEvidenceError, match=cause):
        abi.parse_report(bytes(raw))


def test_random_mutations_of_a_report_raise_only_gpu_evidence_errors(gpu: SyntheticGpu) -> None:
    raw = gpu.report(NONCE)
    rng = random.Random(7)  # noqa: S311  # reproducible mutations, not keys
    for _ in range(300):
        mutated = bytearray(raw[: rng.randrange(len(raw) + 1)])
        for _ in range(rng.randrange(1, 4)):
            if mutated:
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        try:
            abi.parse_report(bytes(mutated))
        except GpuEvidenceError:
            pass


# -- attacks through versions and RIMs -------------------------------------------------------


def test_a_rim_for_another_driver_version_does_not_serve(
    gpu: SyntheticGpu, anchors: GpuAnchors
) -> None:
    # The store has the old driver's RIM only: the GPU's newer driver finds none (no downgrade).
    old = gpu.sibling(driver_version="535.00")
    store = _store((old, "driver", old.rim_xml("driver")), (gpu, "vbios", gpu.rim_xml("vbios")))
    with pytest.raises(
        GpuPolicyError, match=r"GPU 0: the RIM store has no driver RIM for 550.90.07"
    ):
        _appraise([gpu.collect(NONCE)], store, anchors)


def test_a_report_claiming_an_older_driver_must_match_that_drivers_rim(
    gpu: SyntheticGpu, anchors: GpuAnchors
) -> None:
    # A report may state only what the GPU signed; claiming 535.00 meets 535.00's golden values.
    old = gpu.sibling(driver_version="535.00")
    store = _store((old, "driver", old.rim_xml("driver")), (gpu, "vbios", gpu.rim_xml("vbios")))
    claims_old = gpu.collect(NONCE, tamper=Tamper(driver_version="535.00"))
    with pytest.raises(GpuPolicyError, match=r"differ from the RIMs at index 16 \(driver\)"):
        _appraise([claims_old], store, anchors)


def test_versions_outside_the_policy_are_refused(
    gpu: SyntheticGpu, rims: RimStore, anchors: GpuAnchors
) -> None:
    policy = GpuPolicy(allowed_driver_versions=frozenset({"560.35.03"}))
    with pytest.raises(GpuPolicyError, match=r"driver version 550.90.07 is not allowed"):
        _appraise([gpu.collect(NONCE)], rims, anchors, policy=policy)
    policy = GpuPolicy(allowed_vbios_versions=frozenset({"96.00.9F.00.01"}))  # case-insensitive
    assert _appraise([gpu.collect(NONCE)], rims, anchors, policy=policy)


def test_a_rim_with_a_golden_value_changed_after_signing_is_refused(
    gpu: SyntheticGpu, anchors: GpuAnchors
) -> None:
    xml = gpu.rim_xml("driver")
    value = gpu.golden[20].hex().encode()
    changed = xml.replace(value, b"0" + value[1:])
    assert changed != xml
    with pytest.raises(GpuEvidenceError, match="RIM signature does not verify"):
        verify_rim(changed, root=anchors.rim_root, now=NOW)


def test_a_rim_signed_by_another_key_is_refused(
    gpu: SyntheticGpu, rims: RimStore, anchors: GpuAnchors
) -> None:
    other = ec.generate_private_key(ec.SECP384R1())
    store = _store(
        (gpu, "driver", gpu.rim_xml("driver", golden={17: b"\x01" * 48}, signer=other)),
        (gpu, "vbios", gpu.rim_xml("vbios")),
    )
    with pytest.raises(GpuEvidenceError, match="GPU 0: driver RIM: RIM signature does not verify"):
        _appraise(
            [gpu.collect(NONCE, tamper=Tamper(measurements={18: b"\x01" * 48}))], store, anchors
        )


def test_a_test_rim_is_refused_under_nvidias_root(gpu: SyntheticGpu) -> None:
    with pytest.raises(GpuEvidenceError, match="is not the pinned trust anchor"):
        verify_rim(gpu.rim_xml("driver"), root=nvidia_anchors().rim_root, now=NOW)


def test_synthetic_evidence_is_refused_under_nvidias_roots(gpu: SyntheticGpu) -> None:
    with pytest.raises(GpuEvidenceError, match="is not the pinned trust anchor"):
        verify_evidence(gpu.collect(NONCE), anchors=nvidia_anchors(), now=NOW)


XXE = b"""<?xml version="1.0"?>
<!DOCTYPE SoftwareIdentity [<!ENTITY leak SYSTEM "file:///etc/passwd">]>
<SoftwareIdentity xmlns="http://standards.iso.org/iso/19770/-2/2015/schema.xsd">&leak;</SoftwareIdentity>
"""
XXE_IN_ATTRIBUTE = XXE.replace(b">&leak;</SoftwareIdentity>", b' tagId="&leak;"/>')
LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>
<SoftwareIdentity xmlns="http://standards.iso.org/iso/19770/-2/2015/schema.xsd">&b;</SoftwareIdentity>
"""


@pytest.mark.parametrize(
    "xml",
    [XXE, XXE_IN_ATTRIBUTE, LAUGHS],
    ids=["external-entity", "external-entity-in-attribute", "entity-expansion"],
)
def test_xml_with_entities_is_refused_before_anything_else(xml: bytes, anchors: GpuAnchors) -> None:
    refused = r"document type declaration|references external entity"
    with pytest.raises(GpuEvidenceError, match=refused):
        parse_rim(xml)
    with pytest.raises(GpuEvidenceError, match=refused):
        verify_rim(xml, root=anchors.rim_root, now=NOW)
    with pytest.raises(GpuEvidenceError, match=rf"x\.swidtag: .*({refused})"):
        RimStore({"x.swidtag": xml})


def test_an_oversize_or_malformed_rim_is_refused(gpu: SyntheticGpu, anchors: GpuAnchors) -> None:
    with pytest.raises(GpuEvidenceError, match="at most 1048576"):
        verify_rim(b" " * (1024 * 1024 + 1), root=anchors.rim_root, now=NOW)
    with pytest.raises(GpuEvidenceError, match="not well-formed"):
        parse_rim(b"<SoftwareIdentity")
    xml = gpu.rim_xml("vbios")
    with pytest.raises(GpuEvidenceError, match="index 3 appears twice"):
        parse_rim(xml.replace(b'index="4"', b'index="3"', 1))
    with pytest.raises(GpuEvidenceError, match=r"Hash0..Hash1 expected"):
        parse_rim(xml.replace(b'alternatives="1"', b'alternatives="2"', 1))


def test_two_rims_for_the_same_version_are_ambiguous(gpu: SyntheticGpu) -> None:
    xml = gpu.rim_xml("driver")
    store = RimStore({"a.swidtag": xml, "b.swidtag": xml})
    with pytest.raises(GpuPolicyError, match=r"several driver RIM for 550.90.07: a.swidtag, b"):
        store.driver_rim("550.90.07")


def test_the_vbios_rim_is_chosen_by_board(gpu: SyntheticGpu) -> None:
    # Same VBIOS version on two boards: the board identity (from NVIDIA's file names) decides.
    other = gpu.sibling(board=("1010", "0200", "882"))
    mine, theirs = gpu.rim_xml("vbios"), other.rim_xml("vbios")
    store = _store((gpu, "vbios", mine), (other, "vbios", theirs))
    assert (
        store.vbios_rim("96.00.9F.00.01", project="0000", project_sku="0000", chip_sku="000")
        == mine
    )
    assert (
        store.vbios_rim("96.00.9f.00.01", project="1010", project_sku="0200", chip_sku="882")
        == theirs
    )
    with pytest.raises(GpuPolicyError, match=r"no VBIOS RIM for 96.00.9f.00.01 .board 1/2/3"):
        store.vbios_rim("96.00.9f.00.01", project="1", project_sku="2", chip_sku="3")


# -- modes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "policy", "cause"),
    [
        (("SPT", "MPT"), GpuPolicy(), "both SPT and MPT"),
        (("PPCIE",), GpuPolicy(), "feature flag PPCIE is not allowed"),
        ((None,), GpuPolicy(require_feature_flag=True), "carries no feature flag"),
    ],
)
def test_modes_nvidia_refuses_are_refused(
    gpu: SyntheticGpu,
    rims: RimStore,
    anchors: GpuAnchors,
    flags: tuple[str | None, ...],
    policy: GpuPolicy,
    cause: str,
) -> None:
    evidences = [gpu.sibling(feature_flag=flag).collect(NONCE) for flag in flags]
    with pytest.raises(GpuPolicyError, match=cause):
        _appraise(evidences, rims, anchors, policy=policy)


def test_a_gpu_without_a_feature_flag_passes_by_default_like_older_hopper_firmware(
    gpu: SyntheticGpu, rims: RimStore, anchors: GpuAnchors
) -> None:
    (appraisal,) = _appraise([gpu.sibling(feature_flag=None).collect(NONCE)], rims, anchors)
    assert appraisal.summary()["feature_flag"] is None


# -- the wire form ---------------------------------------------------------------------------


def test_evidence_json_with_extra_or_missing_keys_is_refused(gpu: SyntheticGpu) -> None:
    good = gpu.collect(NONCE).to_json()
    for bad in ({**good, "nonce": "AA"}, {k: v for k, v in good.items() if k != "arch"}, [good]):
        with pytest.raises(GpuEvidenceError, match="exactly"):
            GpuEvidence.from_json(bad)


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        ({"report": b64url(bytes(64 * 1024 + 1))}, "report exceeds 65536"),
        ({"report": 5}, "must be strings"),
        ({"arch": "BLACKWELL"}, "not supported"),
        ({"certificate_chain": ["AAAA"] * 9}, "exceeds 8"),
        ({"certificate_chain": []}, "1..8"),
        ({"certificate_chain": [7]}, "entries must be strings"),
        ({"report": "AB"}, "not canonical"),  # nonzero unused bits: a second spelling of b"\0"
        ({"report": "AA=="}, "not unpadded"),
    ],
)
def test_malformed_evidence_json_is_refused(
    gpu: SyntheticGpu, change: dict[str, object], cause: str
) -> None:
    with pytest.raises(GpuEvidenceError, match=cause):
        GpuEvidence.from_json({**gpu.collect(NONCE).to_json(), **change})


def test_a_chain_of_the_wrong_length_is_refused(gpu: SyntheticGpu, anchors: GpuAnchors) -> None:
    evidence = gpu.collect(NONCE)
    shorter = dataclasses.replace(evidence, certificate_chain=evidence.certificate_chain[1:])
    with pytest.raises(GpuEvidenceError, match="must be exactly 5"):
        verify_evidence(shorter, anchors=anchors, now=NOW)


# -- the simulated gate ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "environ"),
    [
        ("simulated", {}),
        ("simulated", {"TDLLM_ALLOW_SIMULATED_TDX": "true"}),
        ("production", ALLOW),
        ("Simulated", ALLOW),
    ],
)
def test_the_simulated_anchor_needs_both_switches(
    gpu: SyntheticGpu, mode: str, environ: dict[str, str]
) -> None:
    with pytest.raises(SimulationRefused, match="simulated GPU trust anchors refused"):
        gpu.anchors(mode=mode, environ=environ)
    if mode != "production":  # production mode takes NVIDIA's roots, whatever else is offered
        with pytest.raises(SimulationRefused):
            select_gpu_anchors(
                mode, simulated_roots=(gpu.device_root_der, gpu.rim_root_der), environ=environ
            )


def test_nvidias_roots_are_not_simulated_anchors_and_production_ignores_test_roots(
    gpu: SyntheticGpu,
) -> None:
    nvidia = nvidia_anchors()
    with pytest.raises(SimulationRefused, match="not simulated GPU anchors"):
        simulated_gpu_anchors(
            nvidia.device_root_der, nvidia.rim_root_der, mode="simulated", environ=ALLOW
        )
    with pytest.raises(SimulationRefused, match="mix"):
        GpuAnchors(gpu.device_root_der, nvidia.rim_root_der)
    chosen = select_gpu_anchors(
        "production", simulated_roots=(gpu.device_root_der, gpu.rim_root_der), environ=ALLOW
    )
    assert chosen == nvidia and chosen.is_nvidia


def test_every_synthetic_subject_says_unsafe_test(gpu: SyntheticGpu, anchors: GpuAnchors) -> None:
    from cryptography import x509

    names = [
        x509.load_der_x509_certificate(der).subject.rfc4514_string()
        for der in (*gpu.certificate_chain(), *parse_rim(gpu.rim_xml("driver")).certificate_chain)
    ]
    assert len(names) == 7 and all("UNSAFE TEST" in n and "NVIDIA" not in n for n in names)
    assert not anchors.is_nvidia


def test_write_rims_makes_a_store_directory(gpu: SyntheticGpu, tmp_path: Path) -> None:
    paths = gpu.write_rims(tmp_path)
    store = RimStore.from_directory(tmp_path)
    assert sorted(store) == sorted(p.name for p in paths) and len(store) == 2
    assert store.versions("driver") == {"550.90.07"}
