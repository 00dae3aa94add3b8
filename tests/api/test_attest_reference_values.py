"""The client checks WHICH TD answers (signed reference values) and what it claims (REPORTDATA
binds profile, model and reference-values id), before any prompt leaves it.

The attack: a host boots its own, prompt-logging image on genuine TDX hardware. Its quote
verifies (genuine platform, UpToDate TCB, our nonce, its own keys bound), only its measurements
differ; without reference values the client would send it the prompt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from flask.testing import FlaskClient

from tdllm.api.app import create_app
from tdllm.api.boot import BootDeps
from tdllm.api.runner import EngineRunner
from tdllm_attest.abi import parse_quote
from tdllm_attest.client import (
    AttestationRefused,
    AttestedService,
    E2eClient,
    anchor_for,
    load_reference_policy,
    new_nonce,
    verify_attestation,
)
from tdllm_attest.client.binding import ATTEST_PROTOCOL, ServiceClaims, report_data
from tdllm_attest.policy_format import Policy
from tdllm_attest.testing.platform import SimulatedTdxPlatform, SyntheticTdFields
from tdllm_attest.testing.provider import SimulatedProvider
from tests.api.conftest import MODEL, api_settings
from tests.api.e2e_transport import RecordingTransport
from tests.client.reference_policy import policy_for, write_signed_policy

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
SIMULATED = {"TDLLM_ALLOW_SIMULATED_TDX": "1"}
PROMPT = "My account number is 4711-0815; what is my balance?"
# what would betray the prompt on the wire: the whole number, punctuation included (a bare
# "4711" turns up by chance in the hex and base64 of nonces and quotes: ~0.5% of runs failed)
SECRET = b"4711-0815"
REFERENCE_ID = "tdllm-reference-values/1.0/8vcpu"


def _sha384(text: str) -> bytes:
    return hashlib.sha384(text.encode()).digest()


RELEASE_MR_TD = _sha384("tdllm release 1.0")
ROGUE_MR_TD = _sha384("the host's own prompt-logging image")
RELEASE_RTMRS = (_sha384("firmware"), _sha384("uki"), _sha384("cmdline"), bytes(48))
RELEASE = SyntheticTdFields(
    mr_td=RELEASE_MR_TD,
    rtmrs=RELEASE_RTMRS,
)
ROGUE = dataclasses.replace(RELEASE, mr_td=ROGUE_MR_TD)


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(datetime.now(UTC))


@pytest.fixture(scope="module")
def policy(platform: SimulatedTdxPlatform) -> Policy:
    """The published reference values of RELEASE."""
    return policy_for(platform, RELEASE)


def _service(
    runner: EngineRunner,
    platform: SimulatedTdxPlatform,
    fields: SyntheticTdFields = RELEASE,
    collateral: Callable[[bytes], str] | None = None,
    **settings: Any,
) -> FlaskClient:
    """A service on a simulated TD measured as `fields`."""
    deps = BootDeps(
        quote_provider=SimulatedProvider(platform, fields),
        collateral=collateral or (lambda _quote: platform.collateral_json()),
    )
    config = api_settings(attestation="simulated", allow_simulated=True, **settings)
    return create_app(config, engine_runner=runner, boot_deps=deps).test_client()


def _attest(
    client: FlaskClient,
    platform: SimulatedTdxPlatform,
    policy: Policy | None,
    *,
    insecure_any_td: bool = False,
    tamper: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> AttestedService:
    nonce = new_nonce()
    doc = client.get("/v1/attestation", query_string={"nonce": nonce}).get_json()
    doc = tamper(doc) if tamper else doc
    anchor = anchor_for(platform.root_der, SIMULATED)
    now = datetime.now(UTC)
    return verify_attestation(
        doc, nonce, anchor, now=now, policy=policy, insecure_any_td=insecure_any_td
    )


def _e2e(
    client: FlaskClient, platform: SimulatedTdxPlatform, policy: Policy | None
) -> tuple[RecordingTransport, E2eClient]:
    transport = RecordingTransport(client)
    return transport, E2eClient(transport, anchor_for(platform.root_der, SIMULATED), policy=policy)


def _ask(e2e: E2eClient) -> dict[str, Any]:
    return e2e.chat([{"role": "user", "content": PROMPT}], max_tokens=4, temperature=0)


def _nothing_was_sent(transport: RecordingTransport) -> None:
    wire = b"".join(transport.wire)
    assert b"ciphertext" not in wire and SECRET not in wire


def test_the_client_accepts_the_td_its_policy_names_and_learns_its_bound_claims(
    runner: EngineRunner, platform: SimulatedTdxPlatform, policy: Policy
) -> None:
    client = _service(runner, platform, reference_values_id=REFERENCE_ID)
    attested = _attest(client, platform, policy)
    assert attested.policy_name == "simulated-test-td"
    assert attested.mr_td == RELEASE_MR_TD.hex()
    assert attested.profile == "td-only"
    assert attested.model == {"id": MODEL, "sealed": None}
    assert attested.reference_values_id == REFERENCE_ID


def test_an_e2e_chat_with_the_right_policy_goes_through(
    runner: EngineRunner, platform: SimulatedTdxPlatform, policy: Policy
) -> None:
    transport, e2e = _e2e(_service(runner, platform), platform, policy)
    assert _ask(e2e)["usage"]["completion_tokens"] >= 1
    assert SECRET not in b"".join(transport.wire)


def test_the_client_refuses_without_a_policy(
    runner: EngineRunner, platform: SimulatedTdxPlatform
) -> None:
    client = _service(runner, platform)
    with pytest.raises(AttestationRefused, match=r"--policy FILE --policy-key.*--insecure-any-td"):
        _attest(client, platform, None)
    transport, e2e = _e2e(client, platform, None)
    with pytest.raises(AttestationRefused, match="no reference-values policy"):
        _ask(e2e)
    _nothing_was_sent(transport)


def test_client_refuses_a_td_with_another_mrtd(
    runner: EngineRunner, platform: SimulatedTdxPlatform, policy: Policy
) -> None:
    """The host booted its own image on genuine hardware: everything verifies but MRTD."""
    transport, e2e = _e2e(_service(runner, platform, ROGUE), platform, policy)
    with pytest.raises(AttestationRefused, match=r"not the TD of policy .*mr_td: found") as err:
        _ask(e2e)
    assert ROGUE_MR_TD.hex() in str(err.value)
    _nothing_was_sent(transport)


def _with_rtmr(index: int, value: bytes) -> SyntheticTdFields:
    r0, r1, r2, r3 = (value if i == index else old for i, old in enumerate(RELEASE_RTMRS))
    return dataclasses.replace(RELEASE, rtmrs=(r0, r1, r2, r3))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        pytest.param(_with_rtmr(1, _sha384("another kernel")), "rtmr1", id="other kernel"),
        pytest.param(_with_rtmr(2, _sha384("init=/bin/sh")), "rtmr2", id="other command line"),
        pytest.param(_with_rtmr(3, _sha384("runtime")), "rtmr3", id="rtmr3 not zero"),
        pytest.param(dataclasses.replace(RELEASE, mr_owner=b"\x01" * 48), "mr_owner", id="owner"),
    ],
)
def test_the_client_refuses_a_td_whose_other_measurements_differ(
    runner: EngineRunner,
    platform: SimulatedTdxPlatform,
    policy: Policy,
    fields: SyntheticTdFields,
    field: str,
) -> None:
    with pytest.raises(AttestationRefused, match=f"{field}: found"):
        _attest(_service(runner, platform, fields), platform, policy)


def _debug(platform: SimulatedTdxPlatform) -> SyntheticTdFields:
    attributes = parse_quote(platform.quote(ROGUE)).td_report.td_attributes_value
    return dataclasses.replace(ROGUE, td_attributes=attributes | 1)  # bit 0: DEBUG


def test_insecure_any_td_accepts_another_td_and_says_nothing_was_checked(
    runner: EngineRunner, platform: SimulatedTdxPlatform
) -> None:
    attested = _attest(_service(runner, platform, ROGUE), platform, None, insecure_any_td=True)
    assert attested.policy_name is None and attested.mr_td == ROGUE_MR_TD.hex()


def test_insecure_any_td_still_refuses_a_debug_td(
    runner: EngineRunner, platform: SimulatedTdxPlatform
) -> None:
    client = _service(runner, platform, _debug(platform))
    with pytest.raises(AttestationRefused, match=r"(?i)debug"):
        _attest(client, platform, None, insecure_any_td=True)


def test_the_policys_tcb_rules_decide_which_tcb_status_passes(
    runner: EngineRunner, platform: SimulatedTdxPlatform
) -> None:
    client = _service(
        runner, platform, collateral=lambda _q: platform.collateral_json(tcb_status="OutOfDate")
    )
    with pytest.raises(AttestationRefused, match="OutOfDate is not accepted"):
        _attest(client, platform, policy_for(platform, RELEASE))
    lenient = policy_for(platform, RELEASE, tcb={"accepted_statuses": ["UpToDate", "OutOfDate"]})
    assert _attest(client, platform, lenient).tcb_status == "OutOfDate"


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda d: d | {"profile": "masked"}, id="profile"),
        pytest.param(lambda d: d | {"model": {"id": "gpt-5", "sealed": None}}, id="model id"),
        pytest.param(
            lambda d: (
                d
                | {
                    "model": {
                        "id": MODEL,
                        "sealed": {
                            "format": "tdllm-sealed/1",
                            "model_id": "0" * 32,
                            "manifest_sha256": "0" * 64,
                        },
                    }
                }
            ),
            id="model claimed sealed",
        ),
        pytest.param(lambda d: d | {"model": None}, id="model dropped"),
        pytest.param(lambda d: d | {"reference_values_id": "another-release"}, id="rv id"),
        pytest.param(lambda d: d | {"reference_values_id": None}, id="rv id dropped"),
    ],
)
def test_claims_altered_in_the_answer_do_not_match_reportdata(
    runner: EngineRunner,
    platform: SimulatedTdxPlatform,
    policy: Policy,
    tamper: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    client = _service(runner, platform, reference_values_id=REFERENCE_ID)
    with pytest.raises(AttestationRefused, match="REPORTDATA does not bind"):
        _attest(client, platform, policy, tamper=tamper)


def test_reportdata_is_the_documented_hash_of_keys_and_claims(
    runner: EngineRunner, platform: SimulatedTdxPlatform
) -> None:
    client = _service(runner, platform, profile="masked", reference_values_id=REFERENCE_ID)
    nonce = new_nonce()
    doc = client.get("/v1/attestation", query_string={"nonce": nonce}).get_json()
    assert doc["protocol"] == ATTEST_PROTOCOL == "tdllm-api-attest/3"
    document = {  # docs/api.md, key by key
        "model": {"id": MODEL, "sealed": None},
        "nonce": nonce,
        "profile": "masked",
        "reference_values_id": REFERENCE_ID,
        "service_public_key": doc["service_public_key"],
        "signing_public_key": doc["signing_public_key"],
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    expected = hashlib.sha512(b"tdllm-api-attest/3\x00" + canonical.encode()).digest()
    claims = ServiceClaims(doc["profile"], doc["model"], doc["reference_values_id"])
    assert report_data(nonce, doc["service_public_key"], doc["signing_public_key"], claims) == (
        expected
    )
    assert doc["report_data"] == expected.hex()


@pytest.mark.parametrize("profile", ["split", "obfuscated"])
def test_e2e_to_a_service_whose_profile_shows_prompts_to_its_device_is_refused(
    runner: EngineRunner, platform: SimulatedTdxPlatform, policy: Policy, profile: str
) -> None:
    transport, e2e = _e2e(_service(runner, platform, profile=profile), platform, policy)
    with pytest.raises(AttestationRefused, match=f"profile '{profile}' shows prompts"):
        _ask(e2e)
    _nothing_was_sent(transport)


@pytest.mark.parametrize("profile", ["td-only", "masked"])
def test_e2e_attests_a_service_whose_profile_keeps_prompts_in_the_td(
    runner: EngineRunner, platform: SimulatedTdxPlatform, policy: Policy, profile: str
) -> None:
    _, e2e = _e2e(_service(runner, platform, profile=profile), platform, policy)
    assert e2e.attest().profile == profile


def test_a_policy_signed_by_another_key_is_refused(
    platform: SimulatedTdxPlatform, tmp_path: Path
) -> None:
    policy_file, key_file = write_signed_policy(tmp_path, platform, RELEASE)
    assert load_reference_policy(policy_file, key_file).name == "simulated-test-td"
    other = Ed25519PrivateKey.generate().public_key()
    key_file.write_bytes(other.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(AttestationRefused, match=r"policy refused: .*does not verify"):
        load_reference_policy(policy_file, key_file)
