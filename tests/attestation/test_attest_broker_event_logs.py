"""RTMR3 by replay of the runtime event log, sent with the attest request.

A policy with ``rtmr3: "event_log"`` releases the key only when the TD's runtime log replays to
the RTMR3 in its quote; an edited, missing or malformed log gets no key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from tdllm_attest.broker.client import KeyReleaseError
from tdllm_attest.eventlog import parse_runtime_log, replay
from tests.attestation.simulated_broker import (
    POLICY_NAME,
    RTMRS,
    TEST_KEY_ID,
    FlaskTransport,
    SimulatedDeployment,
    simulated_deployment,
    td_fields,
)

EVENTS = [
    {"digest": hashlib.sha384(b"tdllm service config").hexdigest(), "description": "config"},
    {"digest": hashlib.sha384(b"sealed model manifest").hexdigest(), "description": "model"},
]
LOG = json.dumps({"events": EVENTS})
RTMR3 = replay(parse_runtime_log(LOG))[3]


@pytest.fixture
def deployment() -> SimulatedDeployment:
    dep = simulated_deployment()
    policy = dep.settings.policies[POLICY_NAME]
    dep.settings.policies[POLICY_NAME] = dataclasses.replace(policy, rtmr3="event_log")
    return dep


def fetch(deployment: SimulatedDeployment, log: str | None) -> bytes:
    client = deployment.key_client(
        FlaskTransport(deployment.app_client()),
        fields=td_fields(rtmrs=(*RTMRS[:3], RTMR3)),
    )
    client.runtime_log = (lambda: log) if log is not None else None
    return bytes(client.fetch_key(TEST_KEY_ID))


def test_key_is_released_when_the_runtime_log_replays_to_rtmr3(
    deployment: SimulatedDeployment,
) -> None:
    assert fetch(deployment, LOG) == deployment.data_keys[TEST_KEY_ID]


def edited_log() -> str:
    events = [dict(e) for e in EVENTS]
    events[1]["digest"] = hashlib.sha384(b"another model").hexdigest()
    return json.dumps({"events": events})


@pytest.mark.parametrize(
    ("log", "status"),
    [
        pytest.param(edited_log(), 403, id="edited event"),
        pytest.param(json.dumps({"events": EVENTS[:1]}), 403, id="dropped event"),
        pytest.param(json.dumps({"events": EVENTS[::-1]}), 403, id="reordered events"),
        pytest.param(None, 403, id="no log for an event_log policy"),
        pytest.param("not json", 401, id="malformed log"),
    ],
)
def test_runtime_log_that_does_not_replay_gets_no_key(
    deployment: SimulatedDeployment, log: str | None, status: int
) -> None:
    with pytest.raises(KeyReleaseError) as info:
        fetch(deployment, log)
    assert info.value.problem["status"] == status


def test_ccel_is_replayed_against_rtmr0_to_2_by_the_broker(tdx_vectors) -> None:  # type: ignore[no-untyped-def]
    from tdllm_attest.eventlog import parse_ccel_log
    from tdllm_attest.policy_format import MeasurementTuple
    from tests.attestation.simulated_broker import MR_TD

    table = (tdx_vectors / "gotdxguest_cos113_ccel_table.bin").read_bytes()
    data = (tdx_vectors / "gotdxguest_cos113_ccel_data.bin").read_bytes()
    rtmr0, rtmr1, rtmr2, _ = replay(parse_ccel_log(data))
    dep = simulated_deployment()
    policy = dep.settings.policies[POLICY_NAME]
    dep.settings.policies[POLICY_NAME] = dataclasses.replace(
        policy, measurements=(MeasurementTuple("cos113", MR_TD, rtmr0, rtmr1, rtmr2),)
    )

    def fetch_with(ccel_data: bytes) -> bytes:
        client = dep.key_client(
            FlaskTransport(dep.app_client()),
            fields=td_fields(rtmrs=(rtmr0, rtmr1, rtmr2, bytes(48))),
        )
        client.ccel = lambda: (table, ccel_data)
        return bytes(client.fetch_key(TEST_KEY_ID))

    assert fetch_with(data) == dep.data_keys[TEST_KEY_ID]
    tampered = bytearray(data)  # one bit of a measured event's digest (not the unused padding)
    tampered[data.index(parse_ccel_log(data)[3].digest) + 5] ^= 1
    with pytest.raises(KeyReleaseError):
        fetch_with(bytes(tampered))
