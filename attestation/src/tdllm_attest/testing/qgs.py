"""UNSAFE simulated quote-generation service: a `SimulatedTdxPlatform` on the host, over HTTP.

On TDX hardware a TD never signs its own quote: the guest kernel hands its TDREPORT to the
host's Quote Generation Service (QGS, backed by the quoting enclave), which returns the signed
quote. This module plays that host role for VMs without TDX (the image's TCG smoke test): the
host process holds the simulated platform (its test PKI never leaves that process) and a guest
in simulated mode asks it for quotes and collateral, so a broker in the same host process can
trust exactly that platform's root. Nothing here is evidence of anything; the quotes carry the
TD fields the host configured, not measurements of the guest.

Protocol (JSON over HTTP, loopback or a forwarded guest port):
    POST /v1/quote        {"report_data": "<128 hex chars>"} -> {"quote": "<base64>"}
    GET  /v1/collateral   -> dcap-qvl QuoteCollateralV3 JSON, signed by the test PKI

`SimulatedQgsProvider` is the guest side (a `QuoteProvider`); `create_qgs_app` the host side
(WSGI, needs werkzeug from the `broker` extra). Both only ever run in the two-switch simulated
mode: the service builds the provider only for ``attestation = "simulated"`` with
TDLLM_ALLOW_SIMULATED_TDX=1.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tdllm_attest.abi import REPORT_DATA_SIZE
from tdllm_attest.quote import QuoteProviderError, _check_report_data
from tdllm_attest.testing.platform import SimulatedTdxPlatform, SyntheticTdFields

log = logging.getLogger(__name__)
QUOTE_PATH = "/v1/quote"
COLLATERAL_PATH = "/v1/collateral"


@dataclass
class SimulatedQgsProvider:
    """UNSAFE: quotes (and collateral) from a simulated QGS at `base_url` (guest side)."""

    base_url: str
    timeout_s: float = 60.0
    session: Any = field(default=None, repr=False)  # a requests.Session (tests inject theirs)

    def __post_init__(self) -> None:
        if self.session is None:
            import requests

            self.session = requests.Session()

    def get_quote(self, report_data: bytes) -> bytes:
        _check_report_data(report_data)
        log.warning("UNSAFE: asking the SIMULATED quote service %s for a quote", self.base_url)
        doc = self._call("post", QUOTE_PATH, json={"report_data": report_data.hex()})
        try:
            return base64.b64decode(str(doc["quote"]), validate=True)
        except (KeyError, TypeError, binascii.Error):
            raise QuoteProviderError("the simulated quote service sent no quote") from None

    def collateral(self, _quote: bytes) -> str:
        return json.dumps(self._call("get", COLLATERAL_PATH))

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        import requests

        try:
            resp = self.session.request(
                method, self.base_url + path, timeout=self.timeout_s, **kwargs
            )
        except requests.RequestException as exc:
            raise QuoteProviderError(
                f"simulated quote service unreachable ({type(exc).__name__})"
            ) from None
        if resp.status_code != 200:
            raise QuoteProviderError(f"simulated quote service answered {resp.status_code}")
        try:
            doc = resp.json()
        except ValueError:
            raise QuoteProviderError("simulated quote service sent no JSON") from None
        if not isinstance(doc, dict):
            raise QuoteProviderError("simulated quote service sent no JSON object")
        return doc


def create_qgs_app(
    platform: SimulatedTdxPlatform, fields: SyntheticTdFields | None = None
) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    """The host side: a WSGI app signing quotes with `platform` for TD `fields`."""
    from werkzeug.wrappers import Request, Response

    td_fields = fields or SyntheticTdFields()

    def reply(status: int, doc: dict[str, Any]) -> Response:
        return Response(json.dumps(doc), status=status, mimetype="application/json")

    def handle(request: Request) -> Response:
        if request.path == COLLATERAL_PATH and request.method == "GET":
            return reply(200, json.loads(platform.collateral_json()))
        if request.path != QUOTE_PATH:
            return reply(404, {"error": f"no such path {request.path}"})
        if request.method != "POST":
            return reply(405, {"error": "use POST"})
        body = request.get_json(silent=True)
        try:
            report_data = bytes.fromhex(str(body["report_data"]))  # type: ignore[index]
        except (KeyError, TypeError, ValueError):
            return reply(400, {"error": "report_data must be hex"})
        if len(report_data) != REPORT_DATA_SIZE:
            return reply(400, {"error": f"report_data must be {REPORT_DATA_SIZE} bytes"})
        log.warning("UNSAFE: signing a SIMULATED TDX quote for a guest")
        quote = platform.quote(dataclasses.replace(td_fields, report_data=report_data))
        return reply(200, {"quote": base64.b64encode(quote).decode()})

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        response: Iterable[bytes] = handle(Request(environ))(environ, start_response)
        return response

    return app
