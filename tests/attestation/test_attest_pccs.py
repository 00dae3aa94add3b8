"""Collateral from a PCCS (Intel PCS API v4) on loopback, serving the real vectors, with a cache."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner, Result

from tdllm_attest import cli, cli_options, errors
from tdllm_attest.abi import parse_quote
from tdllm_attest.collateral import (
    Collateral,
    FreshnessLimits,
    PckPlatform,
    load_collateral,
    pck_platform,
)
from tdllm_attest.errors import CollateralError
from tdllm_attest.pccs import (
    DEFAULT_REFRESH_AFTER,
    CollateralCache,
    PccsClient,
    PccsCollateralSource,
    RetryPolicy,
    normalize_base_url,
)
from tdllm_attest.pccs_server import LoopbackPccs
from tdllm_attest.trust import TrustAnchor
from tdllm_attest.verify import verify_quote
from tests.attestation.attest_mutations import Vector

TODAY = datetime(2026, 12, 3, tzinfo=UTC)  # a fixed "today": every vector has expired by then
V4_PLATFORM = PckPlatform("B0C06F000000", "platform")
REQUESTS_PER_FETCH = 4  # TCB Info, QE Identity, PCK CRL, root CA CRL


@pytest.fixture
def pccs(v4: Vector) -> Iterator[LoopbackPccs]:
    with LoopbackPccs(v4.collateral_path) as server:
        yield server


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


@pytest.fixture
def sleeps() -> list[float]:
    return []


def source(
    server: LoopbackPccs,
    session: requests.Session,
    now: datetime,
    *,
    cache_dir: Path | None = None,
    sleeps: list[float] | None = None,
    refresh_after: timedelta = DEFAULT_REFRESH_AFTER,
) -> PccsCollateralSource:
    retry = RetryPolicy(tries=3, backoff_s=0.5, sleep=(sleeps if sleeps is not None else []).append)
    return PccsCollateralSource(
        PccsClient(server.url, session=session, retry=retry, timeout_s=5),
        CollateralCache(cache_dir) if cache_dir is not None else None,
        now=lambda: now,
        refresh_after=refresh_after,
    )


def same_collateral(a: Collateral, b: Collateral) -> bool:
    """Equal in everything signed or checked (the JSON layout text may differ in formatting)."""
    return all(
        getattr(a, f.name) == getattr(b, f.name) for f in fields(a) if f.name != "source_json"
    )


# -- the real vectors through the wire format -------------------------------------------------


def test_fetched_collateral_verifies_the_real_v4_quote_at_its_pinned_time(
    pccs: LoopbackPccs, session: requests.Session, v4: Vector, intel_anchor: TrustAnchor
) -> None:
    src = source(pccs, session, v4.at)
    verified = verify_quote(v4.quote, src, now=v4.at, anchor=intel_anchor)
    assert (verified.tcb_status, verified.fmspc) == ("UpToDate", "B0C06F000000")
    assert sorted(pccs.requests) == [
        "/sgx/certification/v4/pckcrl?ca=platform&encoding=der",
        "/sgx/certification/v4/rootcacrl",
        "/tdx/certification/v4/qe/identity",
        "/tdx/certification/v4/tcb?fmspc=B0C06F000000",
    ]


def test_fetched_collateral_verifies_the_real_v5_quote_at_its_pinned_time(
    pccs: LoopbackPccs, session: requests.Session, v5: Vector, intel_anchor: TrustAnchor
) -> None:
    pccs.serve(v5.collateral_path)
    verified = verify_quote(v5.quote, source(pccs, session, v5.at), now=v5.at, anchor=intel_anchor)
    assert (verified.tcb_status, verified.fmspc) == ("UpToDate", "90C06F000000")
    assert "/tdx/certification/v4/tcb?fmspc=90C06F000000" in pccs.requests


@pytest.mark.parametrize(
    ("name", "at"),
    [("v4", datetime(2025, 7, 1, tzinfo=UTC)), ("v5", datetime(2026, 3, 1, tzinfo=UTC))],
)
def test_weeks_old_collateral_is_fetched_and_left_to_the_relying_party_s_age_limit(
    request: pytest.FixtureRequest,
    pccs: LoopbackPccs,
    session: requests.Session,
    intel_anchor: TrustAnchor,
    name: str,
    at: datetime,
) -> None:
    vec: Vector = request.getfixturevalue(name)
    pccs.serve(vec.collateral_path)
    src = source(pccs, session, at)
    with pytest.raises(CollateralError, match="freshness limit"):  # default: 24 h since issue
        verify_quote(vec.quote, src, now=at, anchor=intel_anchor)
    lifted = FreshnessLimits(max_age=None)
    verified = verify_quote(vec.quote, src, now=at, anchor=intel_anchor, limits=lifted)
    assert verified.tcb_status == "UpToDate"


def test_signed_texts_survive_the_wire_byte_exactly(
    pccs: LoopbackPccs, session: requests.Session, v4: Vector
) -> None:
    fetched = source(pccs, session, v4.at).get(v4.quote)
    assert same_collateral(fetched, v4.collateral)


@pytest.mark.parametrize(
    "encodings",
    [
        {"pck_crl_as": "pem"},
        {"pck_crl_as": "hex"},
        {"root_crl_as": "der"},
        {"legacy_tcb_header": True},
    ],
    ids=["pck-crl-pem", "pck-crl-hex", "root-crl-der", "legacy-tcb-chain-header"],
)
def test_accepts_the_encodings_real_servers_send(
    pccs: LoopbackPccs,
    session: requests.Session,
    v4: Vector,
    intel_anchor: TrustAnchor,
    encodings: dict[str, object],
) -> None:
    for name, value in encodings.items():
        setattr(pccs.misbehaviour, name, value)
    verified = verify_quote(v4.quote, source(pccs, session, v4.at), now=v4.at, anchor=intel_anchor)
    assert verified.tcb_status == "UpToDate"


def test_fetched_collateral_is_refused_at_today_s_date(
    pccs: LoopbackPccs, session: requests.Session, v4: Vector, intel_anchor: TrustAnchor
) -> None:
    with pytest.raises(CollateralError, match=r"PCCS http://127\.0\.0\.1:\d+: .*stale"):
        verify_quote(v4.quote, source(pccs, session, TODAY), now=TODAY, anchor=intel_anchor)


def test_pck_platform_is_read_from_the_quote_s_pck_leaf(v4: Vector, v5: Vector) -> None:
    assert pck_platform(parse_quote(v4.quote)) == V4_PLATFORM
    assert pck_platform(parse_quote(v5.quote)) == PckPlatform("90C06F000000", "platform")


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shift", "now_offset", "message"),
    [
        (timedelta(0), timedelta(days=40), r"TCB Info is stale: nextUpdate 2025-07-19"),
        (timedelta(days=-60), timedelta(0), r"TCB Info is stale: nextUpdate 2025-05-20"),
        (
            timedelta(0),
            timedelta(days=-30),
            r"TCB Info is issued 2025-06-19T10:16:03\+00:00, after",
        ),
        (timedelta(days=2), timedelta(0), r"TCB Info is issued 2025-06-21T10:16:03\+00:00, after"),
    ],
    ids=["expired-at-now", "stale-pccs", "issued-after-now", "future-dated-pccs"],
)
def test_collateral_not_current_at_now_is_refused_and_not_cached(
    tmp_path: Path,
    pccs: LoopbackPccs,
    session: requests.Session,
    v4: Vector,
    shift: timedelta,
    now_offset: timedelta,
    message: str,
) -> None:
    pccs.misbehaviour.date_shift = shift
    src = source(pccs, session, v4.at + now_offset, cache_dir=tmp_path)
    with pytest.raises(CollateralError, match=message):
        src.get(v4.quote)
    assert list(tmp_path.iterdir()) == []


def test_tcb_info_for_another_fmspc_is_refused_and_not_cached(
    tmp_path: Path, pccs: LoopbackPccs, session: requests.Session, v4: Vector, v5: Vector
) -> None:
    pccs.misbehaviour.tcb_info_from = v5.collateral_path
    with pytest.raises(
        CollateralError, match="TCB Info is for FMSPC 90C06F000000, asked for B0C06F000000"
    ):
        source(pccs, session, v4.at, cache_dir=tmp_path).get(v4.quote)
    assert list(tmp_path.iterdir()) == []


def test_truncated_json_is_refused_without_retrying(
    pccs: LoopbackPccs, session: requests.Session, v4: Vector, sleeps: list[float]
) -> None:
    pccs.misbehaviour.truncate_json = True
    with pytest.raises(CollateralError, match=r"tcb\?fmspc=B0C06F000000: truncated/invalid JSON"):
        source(pccs, session, v4.at, sleeps=sleeps).get(v4.quote)
    assert (pccs.request_count(), sleeps) == (1, [])


def test_body_cut_short_by_the_connection_is_retried_then_refused(
    pccs: LoopbackPccs, session: requests.Session, v4: Vector, sleeps: list[float]
) -> None:
    pccs.misbehaviour.short_body = True
    with pytest.raises(CollateralError, match=r"PCCS unreachable after 3 tries: .*incomplete"):
        source(pccs, session, v4.at, sleeps=sleeps).get(v4.quote)
    assert pccs.request_count() == 3


@pytest.mark.parametrize(
    ("defect", "message"),
    [
        ("bad_signature_hex", "TCB Info for FMSPC B0C06F000000 signature is not 64 bytes of hex"),
        ("bad_issuer_chain", "header TCB-Info-Issuer-Chain is not a URL-encoded PEM"),
    ],
)
def test_invalid_hex_or_pem_is_refused(
    pccs: LoopbackPccs, session: requests.Session, v4: Vector, defect: str, message: str
) -> None:
    setattr(pccs.misbehaviour, defect, True)
    with pytest.raises(CollateralError, match=message):
        source(pccs, session, v4.at).get(v4.quote)


def test_a_client_error_is_not_retried(
    pccs: LoopbackPccs, session: requests.Session, v4: Vector, sleeps: list[float]
) -> None:
    pccs.misbehaviour.status = 404
    with pytest.raises(CollateralError, match="HTTP 404 for TCB Info for FMSPC B0C06F000000"):
        source(pccs, session, v4.at, sleeps=sleeps).get(v4.quote)
    assert (pccs.request_count(), sleeps) == (1, [])


def test_oversized_response_is_refused_without_retrying(
    pccs: LoopbackPccs, session: requests.Session, v4: Vector, sleeps: list[float]
) -> None:
    retry = RetryPolicy(sleep=sleeps.append)
    client = PccsClient(pccs.url, session=session, retry=retry, max_bytes=1000)  # TCB Info: ~3 KB
    with pytest.raises(CollateralError, match=r"response of [0-9]+ bytes exceeds the limit"):
        PccsCollateralSource(client, now=lambda: v4.at).get(v4.quote)
    assert (pccs.request_count(), sleeps) == (1, [])


@pytest.mark.parametrize(
    "outage",
    [{"status": 500}, {"status": 503}, {"status": 429}, {"drop_connection": True}],
    ids=["500", "503", "429", "connection-closed"],
)
def test_outage_makes_exactly_three_tries_then_fails_closed_without_the_stale_cache(
    tmp_path: Path,
    pccs: LoopbackPccs,
    session: requests.Session,
    v4: Vector,
    intel_anchor: TrustAnchor,
    sleeps: list[float],
    outage: dict[str, object],
) -> None:
    source(pccs, session, v4.at, cache_dir=tmp_path).get(v4.quote)  # a cache entry, soon too old
    later = v4.at + DEFAULT_REFRESH_AFTER
    for name, value in outage.items():
        setattr(pccs.misbehaviour, name, value)
    src = source(pccs, session, later, cache_dir=tmp_path, sleeps=sleeps)
    with pytest.raises(CollateralError, match=r"^PCCS unreachable after 3 tries: http://127"):
        verify_quote(v4.quote, src, now=later, anchor=intel_anchor)
    assert pccs.request_count() == REQUESTS_PER_FETCH + 3
    assert sleeps == [0.5, 1.0]


def test_refused_connection_is_retried_and_reported_in_one_line(
    session: requests.Session, v4: Vector, sleeps: list[float]
) -> None:
    with LoopbackPccs(v4.collateral_path) as down:
        url = down.url  # the port is free again after the server closes
    client = PccsClient(url, session=session, retry=RetryPolicy(sleep=sleeps.append))
    with pytest.raises(CollateralError) as caught:
        PccsCollateralSource(client, now=lambda: v4.at).get(v4.quote)
    assert str(caught.value).startswith(f"PCCS unreachable after 3 tries: {url}/tdx/")
    assert "\n" not in str(caught.value) and len(sleeps) == 2


# -- the cache --------------------------------------------------------------------------------


def test_second_fetch_within_the_refresh_window_makes_no_request(
    tmp_path: Path, pccs: LoopbackPccs, session: requests.Session, v4: Vector
) -> None:
    first = source(pccs, session, v4.at, cache_dir=tmp_path).get(v4.quote)
    assert pccs.request_count() == REQUESTS_PER_FETCH
    again = source(pccs, session, v4.at + timedelta(hours=9), cache_dir=tmp_path).get(v4.quote)
    assert pccs.request_count() == REQUESTS_PER_FETCH
    assert again.source_json == first.source_json
    cached = tmp_path / "tdx-B0C06F000000-platform.json"
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]  # no temporary file left
    assert stat.S_IMODE(cached.stat().st_mode) == 0o644
    assert same_collateral(load_collateral(cached), v4.collateral)  # plain dcap-qvl layout


def test_entry_older_than_refresh_after_is_refetched(
    tmp_path: Path, pccs: LoopbackPccs, session: requests.Session, v4: Vector
) -> None:
    source(pccs, session, v4.at, cache_dir=tmp_path).get(v4.quote)
    # the oldest part (PCK CRL, thisUpdate 10:00:35) is 12 h old at 22:00:35
    source(pccs, session, v4.at + timedelta(hours=10, minutes=1), cache_dir=tmp_path).get(v4.quote)
    assert pccs.request_count() == 2 * REQUESTS_PER_FETCH
    week = timedelta(days=7)  # refresh_after is the caller's: a day-old entry is fine here
    next_day = v4.at + timedelta(days=1)
    source(pccs, session, next_day, cache_dir=tmp_path, refresh_after=week).get(v4.quote)
    assert pccs.request_count() == 2 * REQUESTS_PER_FETCH


def test_a_pccs_serving_older_collateral_is_asked_again_only_after_the_refetch_interval(
    tmp_path: Path, pccs: LoopbackPccs, session: requests.Session, v4: Vector
) -> None:
    """The PCCS's own copy is 13 h old: without a minimum interval every call would fetch."""
    late = v4.at + timedelta(hours=11)  # the oldest part is 13 h old: past refresh_after
    src = source(pccs, session, late, cache_dir=tmp_path)
    src.get(v4.quote)
    src.get(v4.quote)
    assert pccs.request_count() == REQUESTS_PER_FETCH  # reused within 5 minutes of the fetch
    later = source(pccs, session, late + timedelta(minutes=6), cache_dir=tmp_path)
    later.get(v4.quote)  # another process, no recent fetch of its own: asks again
    assert pccs.request_count() == 2 * REQUESTS_PER_FETCH


def test_entry_past_next_update_is_refetched_never_reused(
    tmp_path: Path, pccs: LoopbackPccs, session: requests.Session, v4: Vector
) -> None:
    year = timedelta(days=365)
    source(pccs, session, v4.at, cache_dir=tmp_path, refresh_after=year).get(v4.quote)
    after_next_update = datetime(2025, 7, 19, 10, 0, 36, tzinfo=UTC)  # PCK CRL's + 1 s
    src = source(pccs, session, after_next_update, cache_dir=tmp_path, refresh_after=year)
    with pytest.raises(CollateralError, match="PCK CRL is stale"):
        src.get(v4.quote)  # the PCCS has nothing newer: refused, not the expired cache entry
    assert pccs.request_count() == 2 * REQUESTS_PER_FETCH


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe", b'{"pck_crl": "00"}', "WRONG_FMSPC", "BAD_CRL"],
    ids=["not-json", "not-utf8", "missing-fields", "other-fmspc", "crl-not-der"],
)
def test_corrupt_cache_file_is_ignored_and_replaced(
    tmp_path: Path,
    pccs: LoopbackPccs,
    session: requests.Session,
    v4: Vector,
    v5: Vector,
    content: bytes | str,
) -> None:
    cached = CollateralCache(tmp_path).path_for(V4_PLATFORM)
    if content == "WRONG_FMSPC":
        content = v5.collateral_path.read_bytes()
    elif content == "BAD_CRL":
        layout = json.loads(v4.collateral_path.read_text())
        layout["pck_crl"] = "3000"
        content = json.dumps(layout).encode()
    assert isinstance(content, bytes)
    cached.write_bytes(content)
    fetched = source(pccs, session, v4.at, cache_dir=tmp_path).get(v4.quote)
    assert pccs.request_count() == REQUESTS_PER_FETCH
    assert cached.read_text() == fetched.source_json


def test_unwritable_cache_does_not_fail_the_fetch(
    tmp_path: Path, pccs: LoopbackPccs, session: requests.Session, v4: Vector
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    fetched = source(pccs, session, v4.at, cache_dir=blocker / "cache").get(v4.quote)
    assert fetched.fmspc == "B0C06F000000"


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("https://pccs.example:8081", "https://pccs.example:8081"),
        ("https://pccs.example:8081/sgx/certification/v4/", "https://pccs.example:8081"),
        (
            "https://api.trustedservices.intel.com/tdx/certification/v4",
            "https://api.trustedservices.intel.com",
        ),
    ],
)
def test_base_url_accepts_what_qcnl_conf_holds(url: str, base: str) -> None:
    assert normalize_base_url(url) == base


@pytest.mark.parametrize("url", ["pccs.example:8081", "file:///etc/passwd", "https://x/?a=1"])
def test_base_url_must_be_http_or_https(url: str) -> None:
    with pytest.raises(ValueError):
        normalize_base_url(url)


# -- the CLI ----------------------------------------------------------------------------------


def run_cli(*args: str | Path) -> Result:
    return CliRunner().invoke(cli.verify_command, [str(a) for a in args])


def test_cli_with_pccs_verifies_the_v4_quote_and_fills_the_cache(
    tmp_path: Path, tdx_vectors: Path, pccs: LoopbackPccs, v4: Vector
) -> None:
    at = v4.at.isoformat()
    args: list[str | Path] = [tdx_vectors / v4.name, "--pccs", pccs.url, "--cache-dir", tmp_path]
    args += ["--at", at]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "RESULT: PASS" in result.output
    assert run_cli(*args).exit_code == 0
    assert pccs.request_count() == REQUESTS_PER_FETCH  # the second run used the cache


def test_cli_exits_non_zero_with_one_line_when_the_pccs_is_down(
    tmp_path: Path,
    tdx_vectors: Path,
    pccs: LoopbackPccs,
    v4: Vector,
    monkeypatch: pytest.MonkeyPatch,
    sleeps: list[float],
) -> None:
    monkeypatch.setattr(cli_options, "PCCS_RETRY", RetryPolicy(sleep=sleeps.append))
    pccs.misbehaviour.status = 503
    at = v4.at.isoformat()
    result = run_cli(tdx_vectors / v4.name, "--pccs", pccs.url, "--cache-dir", tmp_path, "--at", at)
    output = result.output
    assert result.exit_code == errors.EXIT_COLLATERAL, output
    failed = [line for line in output.splitlines() if line.startswith("[FAIL]")]
    assert failed == [
        f"[FAIL] collateral available: PCCS unreachable after 3 tries: {pccs.url}"
        "/tdx/certification/v4/tcb?fmspc=B0C06F000000: HTTP 503"
    ]
    assert "Traceback" not in output and pccs.request_count() == 3


EXACTLY_ONE = "exactly one of --collateral FILE or --pccs URL"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--collateral", "COLLATERAL", "--pccs", "http://127.0.0.1:9"], EXACTLY_ONE),
        ([], EXACTLY_ONE),
        (["--collateral", "COLLATERAL", "--cache-dir", "."], "--cache-dir is only used with"),
    ],
    ids=["both", "neither", "cache-dir-without-pccs"],
)
def test_cli_wants_exactly_one_collateral_source(
    tdx_vectors: Path, v4: Vector, extra: list[str], message: str
) -> None:
    args = [str(v4.collateral_path) if a == "COLLATERAL" else a for a in extra]
    result = run_cli(tdx_vectors / v4.name, *args, "--at", v4.at.isoformat())
    assert result.exit_code == errors.EXIT_USAGE
    assert message in result.output


def test_cli_refuses_a_pccs_url_that_is_not_http(tdx_vectors: Path, v4: Vector) -> None:
    result = run_cli(tdx_vectors / v4.name, "--pccs", "ftp://pccs.example", "--at", "2025-06-19")
    assert result.exit_code == errors.EXIT_USAGE
