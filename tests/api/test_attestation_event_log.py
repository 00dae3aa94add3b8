"""/v1/attestation carries the runtime event log and the reference-values id; clients replay the
log and judge it with the reference-values policy."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from tdllm.api.app import create_app
from tdllm.api.boot import BootDeps
from tdllm.api.runner import EngineRunner
from tdllm.settings import SettingsError, load_settings
from tdllm_attest.client import AttestationRefused, anchor_for, new_nonce, verify_attestation
from tdllm_attest.eventlog import parse_runtime_log, replay
from tdllm_attest.testing.platform import SimulatedTdxPlatform, SyntheticTdFields
from tdllm_attest.testing.provider import SimulatedProvider
from tests.api.conftest import api_settings
from tests.client.reference_policy import policy_for

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
SIMULATED = {"TDLLM_ALLOW_SIMULATED_TDX": "1"}
EVENTS = ["tdllm service config", "sealed model manifest"]
REFERENCE_ID = "tdllm-reference-values/2025-01/simulated"


def _log_text(descriptions: list[str]) -> str:
    events = [
        {"digest": hashlib.sha384(d.encode()).hexdigest(), "description": d} for d in descriptions
    ]
    return json.dumps({"events": events})


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(datetime.now(UTC))


def _fields(rtmr3: bytes) -> SyntheticTdFields:
    return SyntheticTdFields(rtmrs=(bytes(48), bytes(48), bytes(48), rtmr3))


def _client(
    runner: EngineRunner, platform: SimulatedTdxPlatform, rtmr3: bytes, **settings: Any
) -> FlaskClient:
    """A service whose simulated TD has `rtmr3` in its quotes."""
    fields = _fields(rtmr3)
    deps = BootDeps(
        quote_provider=SimulatedProvider(platform, fields),
        collateral=lambda _quote: platform.collateral_json(),
    )
    config = api_settings(attestation="simulated", allow_simulated=True, **settings)
    return create_app(config, engine_runner=runner, boot_deps=deps).test_client()


def _attest(
    client: FlaskClient,
    platform: SimulatedTdxPlatform,
    tamper: Any = None,
    rtmr3: str | None = "event_log",
    **policy: Any,
) -> Any:
    """Verify against the TD's reference values with RTMR3 as `rtmr3` says (None: no policy,
    --insecure-any-td)."""
    nonce = new_nonce()
    doc = client.get("/v1/attestation", query_string={"nonce": nonce}).get_json()
    doc = tamper(doc) if tamper else doc
    now = datetime.now(UTC)
    reference = (
        None if rtmr3 is None else policy_for(platform, _fields(bytes(48)), rtmr3=rtmr3, **policy)
    )
    return verify_attestation(
        doc,
        nonce,
        anchor_for(platform.root_der, SIMULATED),
        now=now,
        policy=reference,
        insecure_any_td=reference is None,
    )


@pytest.fixture
def measured(
    runner: EngineRunner, platform: SimulatedTdxPlatform, tmp_path: Path
) -> tuple[FlaskClient, Path]:
    log = tmp_path / "rtmr3.json"
    log.write_text(_log_text(EVENTS), encoding="utf-8")
    rtmr3 = replay(parse_runtime_log(log.read_text(encoding="utf-8")))[3]
    client = _client(
        runner, platform, rtmr3, runtime_log=str(log), reference_values_id=REFERENCE_ID
    )
    return client, log


def test_the_runtime_log_replays_to_rtmr3_and_the_reference_id_is_returned(
    measured: tuple[FlaskClient, Path], platform: SimulatedTdxPlatform
) -> None:
    client, _ = measured
    attested = _attest(client, platform)
    assert attested.runtime_events is not None
    assert [e.data.decode() for e in attested.runtime_events] == EVENTS
    assert attested.reference_values_id == REFERENCE_ID
    assert attested.rtmr3 == replay(list(attested.runtime_events))[3].hex()


def test_a_log_that_does_not_replay_to_rtmr3_is_refused(
    measured: tuple[FlaskClient, Path], platform: SimulatedTdxPlatform
) -> None:
    client, log = measured
    log.write_text(_log_text([*EVENTS, "an event RTMR3 never saw"]), encoding="utf-8")
    with pytest.raises(AttestationRefused, match="does not replay"):
        _attest(client, platform)


@pytest.mark.parametrize(
    ("event_log", "refusal"),
    [
        pytest.param(_log_text(EVENTS[:1]), "does not replay", id="an event dropped"),
        pytest.param(_log_text(EVENTS[::-1]), "does not replay", id="events reordered"),
        pytest.param("{not json", "not JSON", id="garbage"),
        pytest.param({"events": []}, "not the runtime log's text", id="not text"),
    ],
)
def test_a_tampered_event_log_in_transit_is_refused(
    measured: tuple[FlaskClient, Path],
    platform: SimulatedTdxPlatform,
    event_log: Any,
    refusal: str,
) -> None:
    client, _ = measured
    with pytest.raises(AttestationRefused, match=refusal):
        _attest(client, platform, lambda doc: doc | {"event_log": event_log})


def _drop_log(doc: dict[str, Any]) -> dict[str, Any]:
    return doc | {"event_log": None}


def test_a_dropped_event_log_cannot_hide_rtmr3(
    measured: tuple[FlaskClient, Path], platform: SimulatedTdxPlatform
) -> None:
    client, _ = measured
    with pytest.raises(AttestationRefused, match=r"rtmr3: found .*none given"):
        _attest(client, platform, _drop_log)
    # without reference values RTMR3 stays unexplained: reported, never replayed
    attested = _attest(client, platform, _drop_log, rtmr3=None)
    assert attested.runtime_events is None and attested.rtmr3 != "00" * 48


def test_a_runtime_event_the_policy_does_not_list_is_refused(
    measured: tuple[FlaskClient, Path], platform: SimulatedTdxPlatform
) -> None:
    client, _ = measured
    listed = [hashlib.sha384(EVENTS[0].encode()).hexdigest()]
    with pytest.raises(AttestationRefused, match=r"rtmr3\.events"):
        _attest(client, platform, rtmr3_allowed_events=listed)


def test_without_settings_the_answer_says_null(
    runner: EngineRunner, platform: SimulatedTdxPlatform
) -> None:
    client = _client(runner, platform, bytes(48))
    doc = client.get("/v1/attestation", query_string={"nonce": new_nonce()}).get_json()
    assert doc["event_log"] is None and doc["reference_values_id"] is None
    attested = _attest(client, platform, rtmr3="zero")
    assert attested.runtime_events is None and attested.reference_values_id is None


@pytest.mark.parametrize("content", [None, "{broken", '{"events": [{"digest": "ab"}]}'])
def test_a_configured_log_that_is_missing_or_broken_is_a_503_not_a_quote_without_it(
    runner: EngineRunner, platform: SimulatedTdxPlatform, tmp_path: Path, content: str | None
) -> None:
    log = tmp_path / "rtmr3.json"
    if content is not None:
        log.write_text(content, encoding="utf-8")
    client = _client(runner, platform, bytes(48), runtime_log=str(log))
    resp = client.get("/v1/attestation", query_string={"nonce": new_nonce()})
    assert resp.status_code == 503
    assert resp.get_json()["error"]["code"] == "event_log_unavailable"


def test_the_settings_follow_defaults_toml_environment_overrides(tmp_path: Path) -> None:
    assert load_settings(environ={}).reference_values_id is None
    toml = tmp_path / "service.toml"
    toml.write_text('[service]\nreference_values_id = "from-file"\nruntime_log = "/run/l"\n')
    assert load_settings(toml, environ={}).reference_values_id == "from-file"
    env = {"TDLLM_REFERENCE_VALUES_ID": "from-env", "TDLLM_RUNTIME_LOG": "/run/tdllm/rtmr3"}
    from_env = load_settings(toml, environ=env)
    assert (from_env.reference_values_id, from_env.runtime_log) == ("from-env", "/run/tdllm/rtmr3")
    overridden = load_settings(toml, environ=env, overrides={"reference_values_id": "cli"})
    assert overridden.reference_values_id == "cli"
    with pytest.raises(SettingsError, match="reference_values_id"):
        load_settings(environ={"TDLLM_REFERENCE_VALUES_ID": "x" * 201})
