"""Benchmark (not a test): full key release, simulated TD -> broker on loopback, median of 50.

Run: PYTHONPATH=. .venv/bin/python tests/attestation/bench_key_release.py
"""

from __future__ import annotations

import logging
import statistics
import threading
import time

import requests
from werkzeug.serving import make_server

from tdllm_attest.broker.app import create_app
from tdllm_attest.broker.client import RequestsTransport
from tests.attestation.simulated_broker import TEST_KEY_ID, FlaskTransport, simulated_deployment

logging.disable(logging.CRITICAL)
d = simulated_deployment(rate_limit=10_000)
server = make_server("127.0.0.1", 0, create_app(d.settings), threaded=True)
t = threading.Thread(target=server.serve_forever, daemon=True)
t.start()
with requests.Session() as s:
    kc = d.key_client(RequestsTransport(f"http://127.0.0.1:{server.server_port}", session=s))
    for _ in range(3):
        kc.fetch_key(TEST_KEY_ID)
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        kc.fetch_key(TEST_KEY_ID)
        times.append(time.perf_counter() - t0)
print(
    f"loopback socket: median {statistics.median(times) * 1000:.1f} ms,"
    f" p90 {sorted(times)[44] * 1000:.1f} ms (n=50)"
)
server.shutdown()
kc2 = d.key_client(FlaskTransport(create_app(d.settings).test_client()))
times = []
for _ in range(50):
    t0 = time.perf_counter()
    kc2.fetch_key(TEST_KEY_ID)
    times.append(time.perf_counter() - t0)
print(f"flask test client: median {statistics.median(times) * 1000:.1f} ms (n=50)")
