"""The UNSAFE simulated quote service: quotes for the asked REPORTDATA, clear errors otherwise."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import requests
from werkzeug.serving import make_server

from tdllm_attest.abi import parse_quote
from tdllm_attest.quote import QuoteProviderError
from tdllm_attest.testing.platform import SimulatedTdxPlatform
from tdllm_attest.testing.qgs import SimulatedQgsProvider, create_qgs_app

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")


@pytest.fixture(scope="module")
def qgs_url() -> Iterator[str]:
    platform = SimulatedTdxPlatform(datetime.now(UTC))
    server = make_server("127.0.0.1", 0, create_qgs_app(platform), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_the_quote_carries_the_requested_report_data(qgs_url: str) -> None:
    provider = SimulatedQgsProvider(qgs_url)
    data = bytes(range(64))
    quote = provider.get_quote(data)
    assert parse_quote(quote).td_report.report_data == data
    collateral = json.loads(provider.collateral(quote))
    assert {"tcb_info", "qe_identity", "pck_crl"} <= set(collateral)


def test_rejects_report_data_of_the_wrong_length(qgs_url: str) -> None:
    with pytest.raises(QuoteProviderError, match="exactly 64 bytes"):
        SimulatedQgsProvider(qgs_url).get_quote(b"short")
    resp = requests.post(f"{qgs_url}/v1/quote", json={"report_data": "00" * 10}, timeout=10)
    assert resp.status_code == 400 and "64 bytes" in resp.json()["error"]
    resp = requests.post(f"{qgs_url}/v1/quote", json={"report_data": "zz"}, timeout=10)
    assert resp.status_code == 400


def test_an_unreachable_service_is_a_quote_error_not_a_traceback() -> None:
    provider = SimulatedQgsProvider("http://127.0.0.1:9", timeout_s=2)
    with pytest.raises(QuoteProviderError, match="unreachable"):
        provider.get_quote(bytes(64))


def test_an_unknown_path_is_404(qgs_url: str) -> None:
    assert requests.get(f"{qgs_url}/v1/other", timeout=10).status_code == 404
    assert requests.get(f"{qgs_url}/v1/quote", timeout=10).status_code == 405
