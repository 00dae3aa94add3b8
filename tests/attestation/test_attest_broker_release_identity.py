"""Which model and version a released key unlocks, and who may answer the TD.

Two attacks by the host, which owns the disk and the TD's network: a rollback (the key of an
older, flawed or laxly sealed version of the owner's model) and an impostor broker (its own key,
for a model it sealed itself). The broker binds model and version to each key record and its
policy sets the minimum version; every answer is signed by the broker key the TD pins.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwcrypto import jwk  # type: ignore[import-untyped]

from tdllm_attest.broker.client import BrokerAuthenticationError, KeyReleaseError
from tdllm_attest.broker.keystore import Keystore, KeystoreError
from tdllm_attest.broker.protocol import PATH_ATTEST, PATH_CHALLENGE
from tdllm_attest.broker.signing import load_broker_public_key, load_signing_key
from tdllm_attest.broker.wrapping import UnwrapError, decrypt_from_broker, encrypt_to_tee
from tdllm_attest.errors import PolicyDocumentError
from tdllm_attest.policy_format import ModelRule, policy_from_document
from tests.attestation.impostor_broker import ImpostorTransport
from tests.attestation.simulated_broker import (
    POLICY_NAME,
    TEST_KEY_ID,
    TEST_MODEL,
    TEST_VERSION,
    FlaskTransport,
    SimulatedDeployment,
    simulated_deployment,
)

AUDIT = "tdllm_attest.broker.audit"
Body = dict[str, Any]


def deployment_with_models(*rules: ModelRule) -> SimulatedDeployment:
    """The test broker, its policy naming `rules` as the models it may release."""
    deployment = simulated_deployment()
    policy = dataclasses.replace(deployment.settings.policies[POLICY_NAME], models=rules)
    settings = dataclasses.replace(deployment.settings, policies={POLICY_NAME: policy})
    return dataclasses.replace(deployment, settings=settings)


def test_the_td_learns_the_model_and_version_its_key_was_released_for() -> None:
    deployment = simulated_deployment()
    transport = FlaskTransport(deployment.app_client())
    release = deployment.key_client(transport).fetch_release(TEST_KEY_ID)
    assert bytes(release.key) == deployment.data_keys[TEST_KEY_ID]
    assert (release.model, release.version) == (TEST_MODEL, TEST_VERSION)


def test_broker_releases_a_key_at_the_policy_minimum_version() -> None:
    deployment = deployment_with_models(ModelRule(TEST_MODEL, TEST_VERSION))
    transport = FlaskTransport(deployment.app_client())
    release = deployment.key_client(transport).fetch_release(TEST_KEY_ID)
    assert release.version == TEST_VERSION


def _refused(deployment: SimulatedDeployment, caplog: pytest.LogCaptureFixture) -> str:
    """Ask for the test key; assert a 403 policy-refused and no key; return the audit reason."""
    transport = FlaskTransport(deployment.app_client())
    with caplog.at_level(logging.INFO, logger=AUDIT), pytest.raises(KeyReleaseError) as info:
        deployment.key_client(transport).fetch_key(TEST_KEY_ID)
    assert info.value.problem["status"] == 403
    assert info.value.problem["type"] == "urn:tdllm:kb:error:policy-refused"
    audit = [r.getMessage() for r in caplog.records if r.name == AUDIT]
    assert not [m for m in audit if m.startswith("released")]
    return [m for m in audit if m.startswith("refused")][-1]


def test_broker_refuses_a_key_below_the_policy_minimum_version(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The owner moved on to version 3: the record of version 2 is a rollback now."""
    reason = _refused(deployment_with_models(ModelRule(TEST_MODEL, TEST_VERSION + 1)), caplog)
    assert "model_version" in reason and "rollback" in reason
    assert f"{TEST_MODEL!r} version {TEST_VERSION}" in reason


def test_broker_refuses_a_key_for_a_model_the_policy_does_not_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reason = _refused(deployment_with_models(ModelRule("another-model", 1)), caplog)
    assert f"model: found {TEST_MODEL!r}" in reason


def test_a_policy_with_an_empty_model_list_releases_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert "model" in _refused(deployment_with_models(), caplog)


def test_td_refuses_an_unsigned_broker_answer() -> None:
    deployment = simulated_deployment()
    impostor = ImpostorTransport(secrets.token_bytes(32), TEST_MODEL, TEST_VERSION)
    with pytest.raises(BrokerAuthenticationError, match="not signed"):
        deployment.key_client(impostor).fetch_key(TEST_KEY_ID)
    assert impostor.quotes  # it did get a genuine quote: that alone must not buy it anything


def test_td_refuses_an_answer_from_an_impostor_broker() -> None:
    deployment = simulated_deployment()
    impostor = ImpostorTransport(
        secrets.token_bytes(32), TEST_MODEL, TEST_VERSION, Ed25519PrivateKey.generate()
    )
    with pytest.raises(BrokerAuthenticationError, match="pinned broker key"):
        deployment.key_client(impostor).fetch_key(TEST_KEY_ID)


def test_td_pinning_another_key_refuses_the_genuine_broker() -> None:
    deployment = simulated_deployment()
    transport = FlaskTransport(deployment.app_client())
    client = deployment.key_client(transport, broker_key=Ed25519PrivateKey.generate().public_key())
    with pytest.raises(BrokerAuthenticationError):
        client.fetch_key(TEST_KEY_ID)


class EditingTransport(FlaskTransport):
    """The genuine broker, with the host editing its attest answer on the way back."""

    def __init__(self, deployment: SimulatedDeployment, edit: dict[str, Any]) -> None:
        super().__init__(deployment.app_client())
        self.edit = edit

    def post_json(self, path: str, body: Body) -> tuple[int, Body]:
        status, answer = super().post_json(path, body)
        return status, (answer | self.edit if path == PATH_ATTEST else answer)


@pytest.mark.parametrize(
    "edit",
    [
        {"version": TEST_VERSION + 1},
        {"model": "another-model"},
        {"signature": {"alg": "Ed25519", "value": "AAAA"}},
        {"signature": {"alg": "HS256", "value": "AAAA"}},
    ],
    ids=["version", "model", "garbage signature", "other algorithm"],
)
def test_td_refuses_a_genuine_answer_the_host_edited(edit: dict[str, Any]) -> None:
    deployment = simulated_deployment()
    with pytest.raises(BrokerAuthenticationError):
        deployment.key_client(EditingTransport(deployment, edit)).fetch_key(TEST_KEY_ID)


class ReplayingTransport:
    """Replays one recorded genuine exchange (challenge and signed answer) to the TD."""

    def __init__(self, recorded: list[tuple[str, Body]]) -> None:
        self.answers = dict(recorded)

    def post_json(self, path: str, body: Body) -> tuple[int, Body]:
        return 200, self.answers[path]


def test_td_refuses_a_recorded_genuine_answer_replayed_to_a_fresh_exchange() -> None:
    """The session id is the impostor's to choose; the TD's fresh ephemeral key is not."""
    deployment = simulated_deployment()
    client = deployment.app_client()
    recorded: list[tuple[str, Body]] = []

    class Recorder(FlaskTransport):
        def post_json(self, path: str, body: Body) -> tuple[int, Body]:
            status, answer = super().post_json(path, body)
            recorded.append((path, answer))
            return status, answer

    deployment.key_client(Recorder(client)).fetch_key(TEST_KEY_ID)
    assert [path for path, _ in recorded] == [PATH_CHALLENGE, PATH_ATTEST]
    replay = deployment.key_client(ReplayingTransport(recorded))
    with pytest.raises(BrokerAuthenticationError):
        replay.fetch_key(TEST_KEY_ID)


def test_jwe_header_must_name_the_model_and_version_the_signed_answer_names() -> None:
    ephemeral = jwk.JWK.generate(kty="OKP", crv="X25519")
    jwe = encrypt_to_tee(b"k" * 32, ephemeral, key_id="k", session_id="s", model="m", version=2)
    assert decrypt_from_broker(jwe, ephemeral, key_id="k", session_id="s", model="m", version=2)
    for model, version in (("other", 2), ("m", 1)):
        with pytest.raises(UnwrapError):
            decrypt_from_broker(
                jwe, ephemeral, key_id="k", session_id="s", model=model, version=version
            )


# --- the keystore -------------------------------------------------------------------------


def test_editing_a_records_model_or_version_makes_its_key_undecryptable() -> None:
    kek = secrets.token_bytes(32)
    store = Keystore([], kek)
    store.wrap("k", POLICY_NAME, {"simulated"}, b"d" * 32, model="m", version=1)
    for name, value in (("version", 5), ("model", "other")):
        doc = json.loads(store.to_json())
        doc["keys"][0][name] = value
        edited = Keystore.from_json(json.dumps(doc), kek)
        record = edited.get("k")
        assert record is not None
        with pytest.raises(KeystoreError, match="does not decrypt"):
            edited.unwrap(record)


def test_a_keystore_without_model_versions_is_refused_clearly() -> None:
    old = {"version": 1, "keys": [{"key_id": "k", "policy": "p", "modes": ["simulated"]}]}
    with pytest.raises(KeystoreError, match="version 1 binds its keys to no model"):
        Keystore.from_json(json.dumps(old), secrets.token_bytes(32))


@pytest.mark.parametrize(("model", "version"), [("", 1), ("m", 0), ("m", True), ("a\nb", 1)])
def test_a_record_needs_a_model_name_and_a_positive_version(model: str, version: int) -> None:
    with pytest.raises(KeystoreError):
        Keystore([], secrets.token_bytes(32)).wrap(
            "k", POLICY_NAME, {"simulated"}, b"d" * 32, model=model, version=version
        )


# --- the policy's `models` -------------------------------------------------------------------


def _policy_document(**changes: Any) -> dict[str, Any]:
    zero = "00" * 48
    return {
        "schema": "tdllm-attest-policy/1",
        "tcb": {"accepted_statuses": ["UpToDate"]},
        "xfam": ["00" * 8],
        "measurements": [{"mr_td": zero, "rtmr0": zero, "rtmr1": zero, "rtmr2": zero}],
        "mr_config_id": zero,
        "mr_owner": zero,
        "mr_owner_config": zero,
        "rtmr3": "zero",
    } | changes


def test_policy_models_list_names_minimum_versions() -> None:
    policy = policy_from_document(
        _policy_document(
            models=[{"model": "a", "min_version": 3}, {"model": "b", "min_version": 0}]
        )
    )
    assert policy.models == (ModelRule("a", 3), ModelRule("b", 0))
    assert policy_from_document(_policy_document()).models is None


@pytest.mark.parametrize(
    "models",
    [
        [{"model": "a"}],
        [{"model": "a", "min_version": -1}],
        [{"model": "a", "min_version": None}],
        [{"model": "", "min_version": 1}],
        [{"model": "a", "min_version": 1, "max_version": 2}],
        [{"model": "a", "min_version": 1}, {"model": "a", "min_version": 2}],
        {"model": "a", "min_version": 1},
    ],
)
def test_policy_models_schema_is_strict(models: Any) -> None:
    with pytest.raises(PolicyDocumentError):
        policy_from_document(_policy_document(models=models))


# --- the broker's signing key ------------------------------------------------------------------


def test_broker_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(
    tmp_path: Path,
) -> None:
    from click.testing import CliRunner

    from tdllm_attest.broker.cli import main

    prefix = tmp_path / "broker"
    result = CliRunner().invoke(main, ["keygen", "--out", str(prefix)])
    assert result.exit_code == 0, result.output
    private, public = tmp_path / "broker.key.pem", tmp_path / "broker.pub.pem"
    assert private.stat().st_mode & 0o777 == 0o600
    key = load_signing_key(private)
    assert load_broker_public_key(public.read_bytes()) == key.public_key()
    again = CliRunner().invoke(main, ["keygen", "--out", str(prefix)])
    assert again.exit_code != 0 and "refusing to overwrite" in again.output
    assert load_signing_key(private).public_key() == key.public_key()


def test_broker_config_without_a_signing_key_is_refused(tmp_path: Path) -> None:
    import click

    from tdllm_attest.broker.cli import settings_from_file

    config = tmp_path / "broker.json"
    doc = {"mode": "production", "pccs_url": "https://pccs.invalid", "collateral_cache_dir": "."}
    config.write_text(json.dumps(doc))
    with pytest.raises(click.UsageError, match="signing_key is required"):
        settings_from_file(config)
