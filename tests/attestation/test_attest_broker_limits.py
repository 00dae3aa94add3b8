"""Who the broker's rate limit counts, and how big its tables may grow (attacks first).

The broker has no client authentication, so a client is its address: the direct peer, or the
right-most untrusted `X-Forwarded-For` entry when (and only when) the peer is a configured
trusted proxy. Both tables are bounded whatever the number of addresses or challenges.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from tdllm_attest.broker.problems import InvalidSession, RateLimited
from tdllm_attest.broker.protocol import PATH_ATTEST, PATH_CHALLENGE, PROTOCOL
from tdllm_attest.broker.ratelimit import RateLimiter, client_address, rate_limit_key
from tdllm_attest.broker.sessions import SessionStore
from tests.attestation.simulated_broker import TEST_KEY_ID, simulated_deployment

PROXY = "10.0.0.1"
CHALLENGE = {"protocol": PROTOCOL, "tee": "tdx", "key_id": TEST_KEY_ID}
T0 = datetime(2026, 1, 15, 12, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def _challenge(client: FlaskClient, peer: str, forwarded: str | None = None) -> int:
    headers = {"X-Forwarded-For": forwarded} if forwarded is not None else {}
    resp = client.post(
        PATH_CHALLENGE, json=CHALLENGE, headers=headers, environ_base={"REMOTE_ADDR": peer}
    )
    return resp.status_code


def _broker(**changes: Any) -> FlaskClient:
    return simulated_deployment(rate_limit=3, **changes).app_client()


# --- whose requests are counted ------------------------------------------------------------


def test_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    client = _broker(trusted_proxies=(ip_network(f"{PROXY}/32"),))
    codes = [_challenge(client, "203.0.113.9", f"198.51.100.{i}") for i in range(5)]
    assert codes == [200, 200, 200, 429, 429]


def test_forwarded_for_is_never_trusted_by_default() -> None:
    client = _broker()
    codes = [_challenge(client, PROXY, f"198.51.100.{i}") for i in range(5)]
    assert codes == [200, 200, 200, 429, 429]


def test_one_noisy_client_behind_a_trusted_proxy_does_not_lock_out_the_others() -> None:
    client = _broker(trusted_proxies=(ip_network("10.0.0.0/24"),))
    noisy = [_challenge(client, PROXY, "198.51.100.7") for _ in range(5)]
    assert noisy == [200, 200, 200, 429, 429]
    assert _challenge(client, PROXY, "198.51.100.8") == 200
    assert _challenge(client, PROXY, "192.0.2.1, 198.51.100.9, 10.0.0.2") == 200


def test_addresses_a_client_prepends_do_not_dodge_the_limit() -> None:
    client = _broker(trusted_proxies=(ip_network(f"{PROXY}/32"),))
    codes = [_challenge(client, PROXY, f"192.0.2.{i}, 198.51.100.7") for i in range(5)]
    assert codes == [200, 200, 200, 429, 429]


def test_ipv6_clients_in_one_slash64_share_a_rate_limit() -> None:
    client = _broker()
    codes = [_challenge(client, f"2001:db8:1:2::{i:x}") for i in range(1, 6)]
    assert codes == [200, 200, 200, 429, 429]
    assert _challenge(client, "2001:db8:1:3::1") == 200


def test_audit_names_the_forwarded_client(caplog: pytest.LogCaptureFixture) -> None:
    client = _broker(trusted_proxies=(ip_network(f"{PROXY}/32"),))
    with caplog.at_level(logging.INFO, logger="tdllm_attest.broker.audit"):
        assert _challenge(client, PROXY, "198.51.100.7") == 200
    assert "client=198.51.100.7 " in caplog.text


@pytest.mark.parametrize(
    ("peer", "header", "expected"),
    [
        ("203.0.113.9", "198.51.100.7", "203.0.113.9"),  # untrusted peer: header ignored
        (PROXY, None, PROXY),  # a trusted proxy without the header is the client
        (PROXY, "", PROXY),
        (PROXY, "198.51.100.7", "198.51.100.7"),
        (PROXY, "1.2.3.4, 198.51.100.7", "198.51.100.7"),
        (PROXY, "198.51.100.7, 10.0.0.2", "198.51.100.7"),  # chained trusted proxies skipped
        (PROXY, "10.0.0.3, 10.0.0.2", "10.0.0.3"),  # all trusted: the farthest hop
        (PROXY, "garbage, 10.0.0.2", "10.0.0.2"),  # unparsable: the hop that reported it
        (PROXY, "not-an-ip", PROXY),
        (PROXY, " 2001:db8::1 ", "2001:db8::1"),
        ("::ffff:10.0.0.1", "198.51.100.7", "198.51.100.7"),  # IPv4-mapped peer
    ],
)
def test_client_address_takes_the_right_most_untrusted_hop(
    peer: str, header: str | None, expected: str
) -> None:
    trusted = (ip_network("10.0.0.0/24"),)
    assert client_address(peer, header, trusted) == expected


def test_rate_limit_key_groups_ipv6_by_slash64_and_keeps_ipv4_whole() -> None:
    assert rate_limit_key("2001:db8:1:2::5") == rate_limit_key("2001:db8:1:2:ffff::1")
    assert rate_limit_key("2001:db8:1:2::5") != rate_limit_key("2001:db8:1:3::5")
    assert rate_limit_key("198.51.100.7") != rate_limit_key("198.51.100.8")
    assert rate_limit_key("::ffff:198.51.100.7") == rate_limit_key("198.51.100.7")
    assert rate_limit_key("") == rate_limit_key("unknown")


# --- bounded tables ------------------------------------------------------------------------


def test_rate_limit_table_stays_bounded_under_an_address_flood() -> None:
    clock = Clock()
    limiter = RateLimiter(clock, 3, timedelta(seconds=60), max_clients=100)
    for i in range(5000):
        limiter.hit(f"198.51.{i // 256}.{i % 256}")
    assert len(limiter) <= 100


def test_rate_limit_table_evicts_expired_clients_before_live_ones() -> None:
    clock = Clock()
    limiter = RateLimiter(clock, 2, timedelta(seconds=60), max_clients=4)
    for _ in range(2):
        limiter.hit("victim-of-nothing")  # at its limit, window started at T0
    clock.now += timedelta(seconds=30)
    for _ in range(2):
        limiter.hit("noisy")  # at its limit, window started at T0 + 30 s
    clock.now += timedelta(seconds=31)  # the first window is over, the second is not
    limiter.hit("a")
    limiter.hit("b")
    limiter.hit("c")
    assert len(limiter) <= 4
    with pytest.raises(RateLimited):
        limiter.hit("noisy")  # its live counter survived the newcomers


def test_the_oldest_live_counter_goes_first_when_the_table_is_full() -> None:
    clock = Clock()
    limiter = RateLimiter(clock, 1, timedelta(seconds=60), max_clients=2)
    limiter.hit("old")
    clock.now += timedelta(seconds=1)
    limiter.hit("young")
    clock.now += timedelta(seconds=1)
    limiter.hit("newcomer")
    assert len(limiter) == 2
    with pytest.raises(RateLimited):
        limiter.hit("young")
    limiter.hit("old")  # forgotten: a fresh budget (see RateLimiter for why that is acceptable)


def test_a_challenge_flood_does_not_lock_out_new_challenges() -> None:
    clock = Clock()
    store = SessionStore(clock, timedelta(seconds=60), max_sessions=50)
    for _ in range(500):
        store.open(TEST_KEY_ID)
    assert len(store) <= 50
    fresh = store.open(TEST_KEY_ID)
    assert store.take(fresh.session_id) == fresh


def test_session_table_evicts_expired_sessions_before_live_ones() -> None:
    clock = Clock()
    store = SessionStore(clock, timedelta(seconds=60), max_sessions=3)
    stale = [store.open(TEST_KEY_ID) for _ in range(2)]
    clock.now += timedelta(seconds=61)
    live = [store.open(TEST_KEY_ID) for _ in range(3)]
    assert len(store) == 3
    for session in stale:
        with pytest.raises(InvalidSession):
            store.take(session.session_id)
    assert [store.take(s.session_id) for s in live] == live


def test_a_session_evicted_by_a_flood_fails_closed() -> None:
    clock = Clock()
    store = SessionStore(clock, timedelta(seconds=60), max_sessions=2)
    victim = store.open(TEST_KEY_ID)
    store.open(TEST_KEY_ID)
    store.open(TEST_KEY_ID)
    with pytest.raises(InvalidSession):
        store.take(victim.session_id)


def test_broker_sessions_are_bounded_by_its_settings() -> None:
    deployment = simulated_deployment(max_sessions=2)
    client = deployment.app_client()
    ids = [
        client.post(
            PATH_CHALLENGE, json=CHALLENGE, environ_base={"REMOTE_ADDR": f"198.51.100.{i}"}
        ).get_json()["session_id"]
        for i in range(3)
    ]
    resp = client.post(PATH_ATTEST, json={"session_id": ids[0], "quote": "AAAA"})
    assert resp.status_code == 401
    assert resp.get_json()["type"].endswith("invalid-session")


def test_broker_rate_table_is_bounded_by_its_settings() -> None:
    deployment = simulated_deployment(rate_limit=1, max_rate_clients=2)
    client = deployment.app_client()
    for i in range(50):
        assert _challenge(client, f"198.51.100.{i}") == 200
    assert _challenge(client, "198.51.100.49") == 429


# --- configuration -------------------------------------------------------------------------


def test_settings_refuse_non_positive_table_sizes() -> None:
    with pytest.raises(ValueError, match="max_sessions"):
        simulated_deployment(max_sessions=0)
    with pytest.raises(ValueError, match="max_rate_clients"):
        simulated_deployment(max_rate_clients=0)


def test_broker_cli_passes_trusted_proxies_to_the_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from tdllm_attest.broker import cli

    base = simulated_deployment().settings
    seen: dict[str, Any] = {}
    monkeypatch.setattr(cli, "settings_from_file", lambda _path: base)
    monkeypatch.setattr(cli, "create_app", lambda settings: seen.setdefault("settings", settings))
    monkeypatch.setattr(cli, "run_simple", lambda *args, **kwargs: None)
    config = tmp_path / "broker.json"
    config.write_text("{}")
    args = ["serve", "--config", str(config), "--trusted-proxy", "10.0.0.0/24"]
    result = CliRunner().invoke(cli.main, [*args, "--trusted-proxy", "2001:db8::1"])
    assert result.exit_code == 0, result.output
    assert seen["settings"].trusted_proxies == (
        ip_network("10.0.0.0/24"),
        ip_network("2001:db8::1/128"),
    )


def test_broker_cli_rejects_a_malformed_trusted_proxy(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tdllm_attest.broker.cli import main

    config = tmp_path / "broker.json"
    config.write_text("{}")
    result = CliRunner().invoke(
        main, ["serve", "--config", str(config), "--trusted-proxy", "10.0.0.1/99"]
    )
    assert result.exit_code == 2
    assert "--trusted-proxy" in result.output
