"""Who may sign collateral: only the pinned TCB Signing identity, issued directly by the root.

The attack: a key that chains to the root but is not Intel's TCB signer (a leaked PCK leaf key,
the PCK CA's key, or a certificate named like the TCB signer but issued by the PCK CA) re-signs
TCB Info so that an OutOfDate platform reads UpToDate. Every signature and chain in such
collateral verifies; only the signer's identity and place in the PKI give it away.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tdllm_attest.abi import parse_quote
from tdllm_attest.broker.client import KeyReleaseError
from tdllm_attest.chain import common_name, verify_chain
from tdllm_attest.collateral import collateral_from_json
from tdllm_attest.errors import ChainError, CollateralError
from tdllm_attest.testing.platform import CollateralSigner, SimulatedTdxPlatform
from tdllm_attest.trust import TrustAnchor, simulated_trust_anchor
from tdllm_attest.verify import _run_dcap, verify_quote
from tests.attestation.attest_mutations import V4_AT
from tests.attestation.simulated_broker import (
    SIM_NOW,
    SIMULATED_ENV,
    TEST_KEY_ID,
    FlaskTransport,
    simulated_deployment,
    td_fields,
)

ATTACK_SIGNERS: tuple[CollateralSigner, ...] = ("pck_leaf", "pck_ca", "pck_ca_lookalike")


pytestmark = pytest.mark.usefixtures("quiet_simulated_warnings")


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(SIM_NOW)


@pytest.fixture(scope="module")
def anchor(platform: SimulatedTdxPlatform) -> TrustAnchor:
    return simulated_trust_anchor(platform.root_der, mode="simulated", environ=SIMULATED_ENV)


def test_collateral_signed_by_the_tcb_signer_verifies(
    platform: SimulatedTdxPlatform, anchor: TrustAnchor
) -> None:
    collateral = collateral_from_json(platform.collateral_json())
    verified = verify_quote(platform.quote(td_fields()), collateral, now=SIM_NOW, anchor=anchor)
    assert verified.tcb_status == "UpToDate"


@pytest.mark.parametrize("signer", ATTACK_SIGNERS)
def test_tcb_info_re_signed_by_another_key_under_the_root_is_refused(
    platform: SimulatedTdxPlatform, anchor: TrustAnchor, signer: CollateralSigner
) -> None:
    collateral = collateral_from_json(platform.collateral_json(signer=signer))
    with pytest.raises(CollateralError, match="TCB Info"):
        verify_quote(platform.quote(td_fields()), collateral, now=SIM_NOW, anchor=anchor)


def test_tcb_signing_certificate_revoked_by_the_root_is_refused(
    platform: SimulatedTdxPlatform, anchor: TrustAnchor
) -> None:
    collateral = collateral_from_json(platform.collateral_json(revoke_tcb_signer=True))
    with pytest.raises(CollateralError, match="revoked by the root"):
        verify_quote(platform.quote(td_fields()), collateral, now=SIM_NOW, anchor=anchor)


def test_broker_refuses_a_key_to_an_out_of_date_td_whose_tcb_info_a_pck_key_re_signed() -> None:
    """The whole attack: the platform is OutOfDate; a leaked PCK key says UpToDate."""
    deployment = simulated_deployment()
    honest = deployment.platform.collateral_json(tcb_status="OutOfDate")
    forged = deployment.platform.collateral_json(signer="pck_leaf")  # says UpToDate
    for collateral, problem in ((honest, "policy-refused"), (forged, "collateral-unavailable")):
        transport = FlaskTransport(deployment.app_client())
        client = deployment.key_client(transport, collateral=collateral)
        with pytest.raises(KeyReleaseError) as info:
            client.fetch_key(TEST_KEY_ID)
        assert info.value.problem["type"].endswith(problem)


# What dcap-qvl 0.7.0 alone decides (docs/attestation.md quotes this): it accepts TCB Info signed
# by a PCK leaf or by a TCB-signer look-alike under the PCK CA, and refuses the PCK CA's own key
# ("Failed to verify certificate chain": its certificate has no digitalSignature usage).
DCAP_QVL_ALONE = {"pck_leaf": True, "pck_ca": False, "pck_ca_lookalike": True}


@pytest.mark.parametrize("signer", ATTACK_SIGNERS)
def test_dcap_qvl_alone_accepts_collateral_from_a_leaked_pck_key(
    platform: SimulatedTdxPlatform, anchor: TrustAnchor, signer: CollateralSigner
) -> None:
    """Locks dcap-qvl's behaviour that makes our signer pin necessary; if a new dcap-qvl starts
    refusing these, this fails and docs/attestation.md must be updated (our pin stays)."""
    collateral = collateral_from_json(platform.collateral_json(signer=signer))
    quote = parse_quote(platform.quote(td_fields()))
    try:
        claims = _run_dcap(quote, collateral, anchor, SIM_NOW)
        accepted = claims["tcb"]["status"] == "UpToDate"
    except ChainError:
        accepted = False
    assert accepted is DCAP_QVL_ALONE[signer]


# --- chain shape: CA flags and exact lengths, on certificates built here ---


def _cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
    key_cert_sign: bool | None = None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    signer_name, signer_key = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    sign = ca if key_cert_sign is None else key_cert_sign
    usage = x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=sign,
        crl_sign=sign,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(SIM_NOW - timedelta(days=1))
        .not_valid_after(SIM_NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .sign(signer_key, hashes.SHA256())
    )


def _chain(
    *, middle_ca: bool, middle_sign: bool = True, leaf_ca: bool = False
) -> list[x509.Certificate]:
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    root = _cert("chain test root", keys[0], None, ca=True)
    middle = _cert(
        "chain test CA", keys[1], (root, keys[0]), ca=middle_ca, key_cert_sign=middle_sign
    )
    leaf = _cert("chain test leaf", keys[2], (middle, keys[1]), ca=leaf_ca)
    return [leaf, middle, root]


def _anchor_of(chain: list[x509.Certificate]) -> TrustAnchor:
    return TrustAnchor.from_der(chain[-1].public_bytes(Encoding.DER))


def test_a_well_formed_chain_passes() -> None:
    chain = _chain(middle_ca=True)
    verify_chain(chain, _anchor_of(chain), SIM_NOW, length=3)


def test_issuer_without_ca_flag_is_refused() -> None:
    chain = _chain(middle_ca=False, middle_sign=True)
    with pytest.raises(ChainError, match="not a CA with keyCertSign"):
        verify_chain(chain, _anchor_of(chain), SIM_NOW)


def test_issuer_without_key_cert_sign_is_refused() -> None:
    chain = _chain(middle_ca=True, middle_sign=False)
    with pytest.raises(ChainError, match="not a CA with keyCertSign"):
        verify_chain(chain, _anchor_of(chain), SIM_NOW)


def test_leaf_that_is_a_ca_is_refused_where_an_end_entity_is_required() -> None:
    chain = _chain(middle_ca=True, leaf_ca=True)
    with pytest.raises(ChainError, match="end-entity"):
        verify_chain(chain, _anchor_of(chain), SIM_NOW)


def test_chain_of_the_wrong_length_is_refused() -> None:
    chain = _chain(middle_ca=True)
    with pytest.raises(ChainError, match="exactly 2"):
        verify_chain(chain, _anchor_of(chain), SIM_NOW, length=2)


def test_real_intel_collateral_chains_pass_the_signer_pins(
    intel_anchor: TrustAnchor, tdx_vectors: Path
) -> None:
    """The real TCB Signing certificate is what the pin names, and the real chains have the
    shapes the pins require (a regression guard for the pins themselves)."""
    doc = json.loads((tdx_vectors / "dcapqvl_tdx_quote_v4_collateral.json").read_text())
    for field, leaf_is_ca in (
        ("tcb_info_issuer_chain", False),
        ("qe_identity_issuer_chain", False),
        ("pck_crl_issuer_chain", True),
    ):
        chain = x509.load_pem_x509_certificates(doc[field].encode())
        verify_chain(chain, intel_anchor, V4_AT, length=2, leaf_is_ca=leaf_is_ca)
    signer = x509.load_pem_x509_certificates(doc["tcb_info_issuer_chain"].encode())[0]
    assert common_name(signer) == intel_anchor.tcb_signing_cn == "Intel SGX TCB Signing"
