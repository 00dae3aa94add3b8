"""NVIDIA's recorded Hopper evidence and RIMs through tdllm_attest.gpu (real vendor data).

The files come from the nv-local-gpu-verifier 2.7.3 wheel (installed --no-deps by `make venv`,
found through its metadata, never imported or copied): a real H100 attestation report, its
five-certificate device chain and signed RIMs. The recorded report answers the nonce
931d8dd0...dfcb (NOT the 4cff7f53... of NVIDIA's config.py: its own test mode would fail the nonce
check had it got that far) and states driver 550.90.07 / VBIOS 96.00.9f.00.01, while the sample
RIMs are for driver 545.00 / VBIOS 96.00.5e.00.01: no RIM for this report ships, so the appraisal
of the real report must stop at the missing RIM, and the measurement comparison is exercised on
the synthetic GPU (test_gpu_synthetic.py).

`RECORDED_AT` (2024-06-01) lies inside every certificate's validity: the device chain is valid
2022-03-01 .. 9999-12-31, the RIM signers 2023-06-27 .. 2025-06-22. Today the RIM signers have
expired, which is checked too.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tdllm_attest.errors import GpuEvidenceError, GpuPolicyError
from tdllm_attest.gpu.abi import SIGNATURE_SIZE, parse_report
from tdllm_attest.gpu.anchors import GpuAnchors, nvidia_anchors
from tdllm_attest.gpu.evidence import GpuEvidence, load_recorded_chain
from tdllm_attest.gpu.policy import GpuPolicy, appraise_gpu
from tdllm_attest.gpu.rim import RimStore, parse_rim, verify_rim
from tdllm_attest.gpu.verify import verify_evidence
from tdllm_attest.testing.gpu import SyntheticGpu
from tdllm_attest.trust import SimulationRefused

RECORDED_AT = datetime(2024, 6, 1, tzinfo=UTC)
RECORDED_NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")
NVIDIA_CONFIG_NONCE = bytes.fromhex(
    "4cff7f5380ead8fad8ec2c531c110aca4302a88f603792801a8ca29ee151af2e"
)
RECORDED_FWID = bytes.fromhex(
    "f5c384aebb579217a2c66b17ed0f28e6a9b8d639041acd7b4721cec004f7275494ba94bb5cdfdb3055ee051762b1f75d"
)
DRIVER_RIM = "Driver_RIM_test_no_gpu.swidtag"
VBIOS_RIM = "1010_0200_882_96005E0001_test_no_gpu.swidtag"
VBIOS_RIM_PROD = "1010_0200_882_96005E0001_PROD.swidtag"


@pytest.fixture(scope="module")
def samples() -> Path:
    try:
        files = importlib.metadata.files("nv-local-gpu-verifier") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("nv-local-gpu-verifier 2.7.3 (NVIDIA's recorded samples) is not installed")
    report = next((f for f in files if f.name == "hopperAttestationReport.txt"), None)
    if report is None:
        pytest.skip("nv-local-gpu-verifier is installed without its samples")
    return Path(str(report.locate())).parent


@pytest.fixture(scope="module")
def evidence(samples: Path) -> GpuEvidence:
    report = bytes.fromhex((samples / "hopperAttestationReport.txt").read_text().strip())
    chain = load_recorded_chain((samples / "hopperCertChain.txt").read_text())
    return GpuEvidence(arch="HOPPER", report=report, certificate_chain=chain)


@pytest.fixture(scope="module")
def anchors() -> GpuAnchors:
    return nvidia_anchors()


def _rim(samples: Path, name: str) -> bytes:
    return (samples / name).read_bytes()


def _verify(evidence: GpuEvidence, anchors: GpuAnchors, now: datetime = RECORDED_AT) -> None:
    verify_evidence(evidence, anchors=anchors, now=now)


# -- what is accepted ------------------------------------------------------------------------


def test_the_recorded_report_parses_to_nvidias_fields(evidence: GpuEvidence) -> None:
    report = parse_report(evidence.report)
    assert report.request_nonce == RECORDED_NONCE
    assert len(report.blocks) == 64 and list(report.measurements) == list(range(1, 65))
    assert report.measurements[36].hex().startswith("c0962ed90316ecea")
    opaque = report.opaque
    assert (opaque.driver_version, opaque.vbios_version) == ("550.90.07", "96.00.9f.00.01")
    assert (opaque.project, opaque.project_sku, opaque.chip_sku) == ("1010", "0200", "882")
    assert opaque.fwid == RECORDED_FWID
    assert opaque.nvdec0_status == 0x55 and opaque.feature_flag is None
    assert report.signed_bytes == evidence.report[:-SIGNATURE_SIZE]


def test_the_recorded_evidence_verifies_under_nvidias_device_root(
    evidence: GpuEvidence, anchors: GpuAnchors
) -> None:
    verified = verify_evidence(evidence, anchors=anchors, now=RECORDED_AT)
    assert verified.fwid == RECORDED_FWID and not verified.simulated


@pytest.mark.parametrize("name", [DRIVER_RIM, VBIOS_RIM, VBIOS_RIM_PROD])
def test_the_sample_rims_verify_under_nvidias_rim_root(
    samples: Path, anchors: GpuAnchors, name: str
) -> None:
    rim = verify_rim(_rim(samples, name), root=anchors.rim_root, now=RECORDED_AT)
    assert rim.product == "GH100" and len(rim.measurements) == 64
    assert (rim.kind, rim.version) in {("driver", "545.00"), ("vbios", "96.00.5e.00.01")}


def _appraise_recorded(
    evidence: GpuEvidence, store: RimStore, anchors: GpuAnchors, nonce: bytes = RECORDED_NONCE
) -> None:
    """The recorded report appraised at its recording time with NVIDIA's default GPU policy."""
    appraise_gpu(
        [evidence], nonce=nonce, rims=store, policy=GpuPolicy(), anchors=anchors, now=RECORDED_AT
    )


def test_the_recorded_report_is_refused_without_a_rim_for_its_driver(
    samples: Path, evidence: GpuEvidence, anchors: GpuAnchors
) -> None:
    # The report is genuine and fresh for its nonce, but no RIM for driver 550.90.07 ships: an
    # older driver's RIM (545.00) must not stand in for it (downgrade).
    store = RimStore({n: _rim(samples, n) for n in (DRIVER_RIM, VBIOS_RIM)})
    with pytest.raises(GpuPolicyError, match=r"GPU 0: .*no driver RIM for 550\.90\.07"):
        _appraise_recorded(evidence, store, anchors)


# -- attacks on the report -------------------------------------------------------------------


def _flip_positions(raw: bytes) -> list[int]:
    """Every byte but those inside measurement values, and every 23rd of those (speed)."""
    record_start, blocks, block_size = 45, 64, 7 + 48  # after request (37) + response header (8)
    record_end = record_start + blocks * block_size
    positions = [*range(record_start), *range(record_end, len(raw))]
    for block in range(blocks):
        start = record_start + block * block_size
        positions += [
            *range(start, start + 7),
            *range(start + 7 + block % 23, start + block_size, 23),
        ]
    return sorted(positions)


def test_a_flipped_bit_anywhere_in_the_report_is_refused(
    evidence: GpuEvidence, anchors: GpuAnchors
) -> None:
    raw = evidence.report
    assert parse_report(raw).blocks[-1].value == raw[45 + 63 * 55 + 7 : 45 + 64 * 55]
    for position in _flip_positions(raw):  # the signed part and the signature
        flipped = bytearray(raw)
        flipped[position] ^= 1 << (position % 8)
        with pytest.raises(GpuEvidenceError):
            _verify(dataclasses.replace(evidence, report=bytes(flipped)), anchors)


def test_a_truncated_or_extended_report_is_refused(
    evidence: GpuEvidence, anchors: GpuAnchors
) -> None:
    raw = evidence.report
    for cut in [*range(1, len(raw), 61), len(raw) - 1]:
        with pytest.raises(GpuEvidenceError):
            _verify(dataclasses.replace(evidence, report=raw[:cut]), anchors)
    with pytest.raises(GpuEvidenceError, match="trailing"):
        parse_report(raw + b"\0")


def test_the_recorded_report_does_not_answer_another_nonce(
    samples: Path, evidence: GpuEvidence, anchors: GpuAnchors
) -> None:
    store = RimStore({n: _rim(samples, n) for n in (DRIVER_RIM, VBIOS_RIM)})
    with pytest.raises(GpuEvidenceError, match="GPU 0: the report answers another nonce"):
        _appraise_recorded(evidence, store, anchors, NVIDIA_CONFIG_NONCE)


# -- attacks on the chain --------------------------------------------------------------------


def _lookalike_root(template: x509.Certificate) -> x509.Certificate:
    """A self-made root with the subject of NVIDIA's ('NVIDIA Device Identity CA')."""
    key = ec.generate_private_key(ec.SECP384R1())
    return (
        x509.CertificateBuilder()
        .subject_name(template.subject)
        .issuer_name(template.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(template.not_valid_before_utc)
        .not_valid_after(template.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA384())
    )


def test_a_chain_ending_in_a_self_made_nvidia_root_is_refused(
    evidence: GpuEvidence, anchors: GpuAnchors
) -> None:
    real_root = x509.load_der_x509_certificate(evidence.certificate_chain[-1])
    fake = _lookalike_root(real_root).public_bytes(Encoding.DER)
    forged = dataclasses.replace(
        evidence, certificate_chain=(*evidence.certificate_chain[:-1], fake)
    )
    with pytest.raises(GpuEvidenceError, match="not the pinned trust anchor"):
        _verify(forged, anchors)
    # ... and the look-alike cannot be made an anchor either, not even a simulated one.
    with pytest.raises(SimulationRefused, match="claims to be NVIDIA"):
        GpuAnchors(fake, anchors.rim_root_der)


def test_a_leaf_from_another_chain_is_refused(evidence: GpuEvidence, anchors: GpuAnchors) -> None:
    other = SyntheticGpu(RECORDED_AT).certificate_chain()[0]
    forged = dataclasses.replace(
        evidence, certificate_chain=(other, *evidence.certificate_chain[1:])
    )
    with pytest.raises(GpuEvidenceError, match="is not signed by"):
        _verify(forged, anchors)


def test_a_chain_without_its_root_or_with_a_certificate_missing_is_refused(
    evidence: GpuEvidence, anchors: GpuAnchors
) -> None:
    chain = evidence.certificate_chain
    for forged_chain in (chain[:-1], (chain[0], *chain[2:]), (chain[0], chain[-1])):
        with pytest.raises(GpuEvidenceError, match="certificates, must be exactly 5"):
            _verify(dataclasses.replace(evidence, certificate_chain=forged_chain), anchors)


def test_the_device_chain_is_refused_outside_its_validity(
    evidence: GpuEvidence, anchors: GpuAnchors
) -> None:
    leaf = x509.load_der_x509_certificate(evidence.certificate_chain[2])
    with pytest.raises(GpuEvidenceError, match="is not valid at"):
        _verify(evidence, anchors, leaf.not_valid_before_utc - timedelta(seconds=1))
    with pytest.raises(GpuEvidenceError, match="is not valid at"):
        _verify(evidence, anchors, datetime.max.replace(tzinfo=UTC))


# -- attacks on the RIMs ---------------------------------------------------------------------


def test_the_sample_rims_are_refused_after_their_signers_expired(
    samples: Path, anchors: GpuAnchors
) -> None:
    with pytest.raises(GpuEvidenceError, match=r"HCC RIM L4 Signer.*is not valid at"):
        verify_rim(
            _rim(samples, DRIVER_RIM), root=anchors.rim_root, now=datetime(2026, 1, 1, tzinfo=UTC)
        )


def test_a_rim_with_one_golden_value_changed_is_refused(samples: Path, anchors: GpuAnchors) -> None:
    xml = _rim(samples, DRIVER_RIM)
    golden = next(m for m in parse_rim(xml).measurements.values() if m.active)
    value = next(iter(golden.alternatives)).hex()
    changed = xml.replace(value.encode(), ("f" + value[1:]).encode(), 1)
    assert changed != xml and parse_rim(changed).measurements != parse_rim(xml).measurements
    with pytest.raises(GpuEvidenceError, match="RIM signature does not verify"):
        verify_rim(changed, root=anchors.rim_root, now=RECORDED_AT)


def test_a_rim_signed_by_a_test_key_is_refused_in_production(
    evidence: GpuEvidence, anchors: GpuAnchors
) -> None:
    # A synthetic RIM pair for exactly the recorded GPU's versions and board, so the real report
    # gets as far as the RIMs: the test RIM root is not NVIDIA's.
    gpu = SyntheticGpu(RECORDED_AT, board=("1010", "0200", "882"))
    store = RimStore({name: gpu.rim_xml(kind) for kind, name in gpu.rim_file_names().items()})
    with pytest.raises(GpuEvidenceError, match=r"GPU 0: driver RIM: .*not the pinned trust anchor"):
        _appraise_recorded(evidence, store, anchors)


def test_a_rim_is_judged_by_the_pinned_root_not_the_one_it_embeds(
    samples: Path, anchors: GpuAnchors
) -> None:
    # The real RIM checked against another root: its own embedded root does not count.
    other_root = x509.load_der_x509_certificate(SyntheticGpu(RECORDED_AT).rim_root_der)
    with pytest.raises(GpuEvidenceError, match=r"NVIDIA CoRIM.*is not the pinned trust anchor"):
        verify_rim(_rim(samples, DRIVER_RIM), root=other_root, now=RECORDED_AT)


def test_nvidias_anchors_are_pinned(anchors: GpuAnchors) -> None:
    assert anchors.is_nvidia
    names = {
        anchors.device_root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
        anchors.rim_root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
    }
    assert names == {"NVIDIA Device Identity CA", "NVIDIA CoRIM signing Root CA"}
