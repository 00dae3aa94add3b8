"""Benchmark: quote verification and a full key release on loopback.

Run: `python -m tdllm_attest.bench --quote Q --collateral C --at ISO8601`.

Verification: `verify_quote` on the given quote/collateral at `--at` (e.g. the real v4 vector at
its pinned time), or on a synthetic quote of an UNSAFE simulated platform when no quote is given.
The first (cold) call and the median of the warm calls are reported: warm calls reuse the
remembered certificate/CRL parsing and collateral signature checks (`tdllm_attest.memo`), while
every time-dependent and per-quote check still runs.

Key release (needs the `broker` extra and `TDLLM_ALLOW_SIMULATED_TDX=1`, the simulated-mode
switch): a simulated TD asks a broker served on 127.0.0.1 for a data key: challenge, ephemeral
X25519 key, synthetic quote, attest (full verification + policy), JWE, unwrap; over a real socket
with `requests`; the broker's collateral comes from memory, from a PCCS on loopback for every
release (cold), or from that PCCS behind the on-disk cache (cached).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tdllm_attest import abi
from tdllm_attest.collateral import (
    Collateral,
    CollateralSource,
    FetcherCollateralSource,
    collateral_from_json,
    load_collateral,
)
from tdllm_attest.policy_format import MeasurementTuple, Policy, TcbPolicy
from tdllm_attest.testing.platform import SimulatedTdxPlatform, SyntheticTdFields
from tdllm_attest.trust import (
    ALLOW_SIMULATED_ENV,
    MODE_SIMULATED,
    TrustAnchor,
    simulated_trust_anchor,
)
from tdllm_attest.verify import verify_quote

SIM_NOW = datetime(2026, 1, 15, 12, tzinfo=UTC)
BENCH_KEY_ID = "bench/key/1"
BENCH_POLICY = "bench-simulated"
_MR_TD = bytes(range(48))
_RTMRS = (b"\x01" * 48, b"\x02" * 48, b"\x03" * 48, bytes(48))


def _median_ms(fn: Callable[[], object], n: int, warmup: int) -> tuple[float, float]:
    """(first call, median of `n` calls after `warmup` more) in milliseconds."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first * 1000, statistics.median(times) * 1000


def bench_verify(
    raw_quote: bytes, collateral: Collateral, *, now: datetime, anchor: TrustAnchor, n: int
) -> dict[str, float]:
    """Cold and warm median `verify_quote` time in ms."""
    first, median = _median_ms(
        lambda: verify_quote(raw_quote, collateral, now=now, anchor=anchor), n, warmup=5
    )
    return {"verify_first_ms": first, "verify_median_ms": median}


def _fields() -> SyntheticTdFields:
    return SyntheticTdFields(mr_td=_MR_TD, rtmrs=_RTMRS)


def _policy(platform: SimulatedTdxPlatform) -> Policy:
    report = abi.parse_quote(platform.quote(_fields())).td_report
    return Policy(
        name=BENCH_POLICY,
        tcb=TcbPolicy(),
        xfam=frozenset({report.xfam}),
        measurements=(MeasurementTuple("bench", _MR_TD, _RTMRS[0], _RTMRS[1], _RTMRS[2]),),
        mr_config_id=report.mr_config_id,
        mr_owner=report.mr_owner,
        mr_owner_config=report.mr_owner_config,
        rtmr3="zero",
    )


def bench_release(n: int) -> dict[str, float]:
    """Median full key release (simulated TD -> loopback broker) in ms, by collateral source.

    `release_*`: the broker's collateral source hands over collateral already in memory (the
    verification and protocol alone); `release_pccs_cold_*`: the broker fetches it from a PCCS
    on loopback for every release (no cache: four HTTP GETs); `release_pccs_cached_*`: the same
    PCCS behind the on-disk cache, as `tdllm-broker serve` runs (the first release fetches).
    """
    import tempfile

    from tdllm_attest.pccs import CollateralCache, PccsClient, PccsCollateralSource
    from tdllm_attest.pccs_server import LoopbackPccs

    platform = SimulatedTdxPlatform(SIM_NOW)
    collateral = platform.collateral_json()
    result: dict[str, float] = {}
    memory = FetcherCollateralSource(lambda _quote: collateral)
    first, median = _time_releases(platform, memory, n)
    result |= {"release_first_ms": first, "release_median_ms": median}
    with LoopbackPccs(lambda: collateral) as pccs, tempfile.TemporaryDirectory() as cache_dir:
        for name, cache in (("cold", None), ("cached", CollateralCache(Path(cache_dir)))):
            client = PccsClient(pccs.url)
            source = PccsCollateralSource(client, cache, now=lambda: SIM_NOW)
            try:
                first, median = _time_releases(platform, source, n)
            finally:
                client.close()
            result |= {f"release_pccs_{name}_first_ms": first}
            result |= {f"release_pccs_{name}_median_ms": median}
    return result


def _time_releases(
    platform: SimulatedTdxPlatform, collateral: CollateralSource, n: int
) -> tuple[float, float]:
    """(first, median) ms of key releases from a broker on 127.0.0.1 using `collateral`."""
    import requests  # broker extra, imported only for this benchmark
    from werkzeug.serving import make_server

    from tdllm_attest.broker.app import create_app
    from tdllm_attest.broker.client import KeyClient, RequestsTransport
    from tdllm_attest.broker.keystore import Keystore
    from tdllm_attest.broker.settings import BrokerSettings
    from tdllm_attest.testing.provider import SimulatedProvider

    anchor = simulated_trust_anchor(platform.root_der, mode=MODE_SIMULATED, environ=os.environ)
    keystore = Keystore([], secrets.token_bytes(32))
    data_key = secrets.token_bytes(32)
    keystore.wrap(BENCH_KEY_ID, BENCH_POLICY, {MODE_SIMULATED}, data_key, model="bench", version=1)
    signing_key = Ed25519PrivateKey.generate()
    settings = BrokerSettings(
        keystore=keystore,
        policies={BENCH_POLICY: _policy(platform)},
        anchor=anchor,
        signing_key=signing_key,
        now=lambda: SIM_NOW,
        collateral=collateral,
        rate_limit=1_000_000,
        session_ttl=timedelta(seconds=60),
    )
    server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with requests.Session() as session:
            client = KeyClient(
                transport=RequestsTransport(
                    f"http://127.0.0.1:{server.server_port}", session=session
                ),
                provider=SimulatedProvider(platform, _fields()),
                broker_key=signing_key.public_key(),
            )

            def release() -> None:
                if bytes(client.fetch_key(BENCH_KEY_ID)) != data_key:
                    raise RuntimeError("released key differs from the stored one")

            return _median_ms(release, n, warmup=3)
    finally:
        server.shutdown()


def _parse_at(value: str) -> datetime:
    at = datetime.fromisoformat(value)
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tdllm_attest.bench", description=__doc__)
    parser.add_argument("--quote", type=Path, help="quote file (default: a simulated quote)")
    parser.add_argument("--collateral", type=Path, help="collateral JSON for --quote")
    parser.add_argument("--at", help="verification time for --quote (ISO 8601)")
    parser.add_argument("-n", type=int, default=200, help="timed verifications (default 200)")
    parser.add_argument("--releases", type=int, default=50, help="timed key releases (50)")
    parser.add_argument("--no-release", action="store_true", help="skip the key release")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # simulated mode warns on every quote

    result: dict[str, Any] = {}
    if args.quote is not None:
        if args.collateral is None or args.at is None:
            parser.error("--quote needs --collateral and --at")
        raw = args.quote.read_bytes()
        collateral = load_collateral(args.collateral)
        now, anchor = _parse_at(args.at), TrustAnchor.intel()
        result["verify_quote"] = str(args.quote)
    else:
        platform = SimulatedTdxPlatform(SIM_NOW)
        raw, now = platform.quote(_fields()), SIM_NOW
        collateral = collateral_from_json(platform.collateral_json())
        anchor = TrustAnchor.from_der(platform.root_der)  # benchmark only; no key is released
        result["verify_quote"] = "simulated"
    result |= bench_verify(raw, collateral, now=now, anchor=anchor, n=args.n)
    if not args.no_release:
        if os.environ.get(ALLOW_SIMULATED_ENV) != "1":
            print(
                f"key release skipped: it runs a simulated TD; set {ALLOW_SIMULATED_ENV}=1",
                file=sys.stderr,
            )
        else:
            result |= bench_release(args.releases)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for name, value in result.items():
            print(f"{name}: {value:.2f}" if isinstance(value, float) else f"{name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
