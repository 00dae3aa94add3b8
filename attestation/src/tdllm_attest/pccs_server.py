"""A PCCS (Intel PCS API v4 wire format) on 127.0.0.1: for tests, benches and the simulated TD.

It serves collateral in dcap-qvl's layout (a file, e.g. the real test vectors read from
shared/testvectors at run time, or a callable such as a simulated platform's `collateral_json`)
the way a PCCS does, so `pccs.PccsClient` runs its production path against it. Responses are
built by string concatenation around the exact signed texts, so the signatures still verify.
`Misbehaviour` makes the server fail on purpose (outage, truncation, another FMSPC, shifted dates,
broken encodings); every request path is recorded so tests can count tries. It holds no secret
and decides nothing: whatever it serves is verified by the client like any PCCS's answer.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, quote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tdllm_attest.collateral import PCK_CA_TYPES

_DATE_FIELD = re.compile(r'"(issueDate|nextUpdate)":"([^"]+)"')


@dataclass
class Misbehaviour:
    """What the server does wrong; the default is a well-behaved PCCS."""

    status: int | None = None  # answer every request with this HTTP status
    drop_connection: bool = False  # close the connection without any answer
    truncate_json: bool = False  # JSON bodies cut in half (Content-Length matches the cut)
    short_body: bool = False  # Content-Length of the full body, half of it sent, then close
    tcb_info_from: Path | None = None  # serve this collateral file's TCB Info for any FMSPC
    date_shift: timedelta = timedelta(0)  # moves TCB Info/QE Identity dates (breaks signatures)
    bad_signature_hex: bool = False  # "signature" of TCB Info is not hex
    bad_issuer_chain: bool = False  # TCB Info issuer-chain header is not PEM
    legacy_tcb_header: bool = False  # SGX-TCB-Info-Issuer-Chain, as older PCCS versions send
    pck_crl_as: str | None = None  # "pem" or "hex" whatever `encoding` asks; None honours it
    root_crl_as: str = "hex"  # PCCS sends hex text; "der" as the CRL distribution point does


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    is_json: bool = False


def _shift_dates(text: str, shift: timedelta) -> str:
    def moved(match: re.Match[str]) -> str:
        when = datetime.fromisoformat(match[2]).astimezone(UTC) + shift
        return f'"{match[1]}":"{when.strftime("%Y-%m-%dT%H:%M:%SZ")}"'

    return _DATE_FIELD.sub(moved, text) if shift else text


class LoopbackPccs:
    """A threaded PCCS on an ephemeral loopback port; use as a context manager."""

    def __init__(self, collateral: Path | Callable[[], str], *, port: int = 0) -> None:
        self.misbehaviour = Misbehaviour()
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._source: Callable[[], str] = lambda: "{}"
        self.serve(collateral)
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._server.daemon_threads = True
        self._server.pccs = self  # type: ignore[attr-defined]  # read by _Handler
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def serve(self, collateral: Path | Callable[[], str]) -> None:
        """Serve this collateral (a dcap-qvl layout file, or a callable returning its text)."""
        if isinstance(collateral, Path):
            path = collateral
            self._source = lambda: path.read_text(encoding="utf-8")
        else:
            self._source = collateral

    @property
    def _layout(self) -> dict[str, str]:
        layout: dict[str, str] = json.loads(self._source())
        return layout

    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def start(self) -> LoopbackPccs:
        """Serve on a background thread until `close`."""
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> LoopbackPccs:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- request handling (called on the server's threads) ---------------------------------

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append(handler.path)
        m = self.misbehaviour
        if m.drop_connection:
            handler.close_connection = True
            return
        if m.status is not None:
            self._send(handler, _Reply(m.status, b'{"error": "misbehaving on purpose"}'))
            return
        parts = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        routes: dict[str, Callable[[dict[str, str]], _Reply]] = {
            "/tdx/certification/v4/tcb": self._tcb_info,
            "/tdx/certification/v4/qe/identity": self._qe_identity,
            "/sgx/certification/v4/pckcrl": self._pck_crl,
            "/sgx/certification/v4/rootcacrl": self._root_crl,
        }
        route = routes.get(parts.path)
        self._send(handler, route(query) if route else _Reply(404, b"no such endpoint"))

    def _tcb_info(self, query: dict[str, str]) -> _Reply:
        m = self.misbehaviour
        layout = self._layout
        if m.tcb_info_from is not None:
            layout = json.loads(m.tcb_info_from.read_text(encoding="utf-8"))
        elif json.loads(layout["tcb_info"])["fmspc"].upper() != query.get("fmspc", "").upper():
            return _Reply(404, b"")  # what PCS answers for an FMSPC it does not know
        signature = "zz" * 64 if m.bad_signature_hex else layout["tcb_info_signature"]
        chain = "not a certificate" if m.bad_issuer_chain else layout["tcb_info_issuer_chain"]
        header = "SGX-TCB-Info-Issuer-Chain" if m.legacy_tcb_header else "TCB-Info-Issuer-Chain"
        return self._signed("tcbInfo", layout["tcb_info"], signature, header, chain)

    def _qe_identity(self, query: dict[str, str]) -> _Reply:
        layout = self._layout
        return self._signed(
            "enclaveIdentity",
            layout["qe_identity"],
            layout["qe_identity_signature"],
            "SGX-Enclave-Identity-Issuer-Chain",
            layout["qe_identity_issuer_chain"],
        )

    def _signed(self, key: str, text: str, signature: str, header: str, chain: str) -> _Reply:
        inner = _shift_dates(text, self.misbehaviour.date_shift)
        body = '{"' + key + '":' + inner + ',"signature":"' + signature + '"}'
        headers = {"Content-Type": "application/json", header: quote(chain, safe="")}
        return _Reply(200, body.encode("utf-8"), headers, is_json=True)

    def _pck_crl(self, query: dict[str, str]) -> _Reply:
        layout = self._layout
        der = bytes.fromhex(layout["pck_crl"])
        cn = x509.load_der_x509_crl(der).issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if _ca_of(str(cn[0].value)) != query.get("ca"):
            return _Reply(404, b"")
        encoding = self.misbehaviour.pck_crl_as or query.get("encoding", "pem")
        chain = quote(layout["pck_crl_issuer_chain"], safe="")
        return _Reply(200, _encode_crl(der, encoding), {"SGX-PCK-CRL-Issuer-Chain": chain})

    def _root_crl(self, query: dict[str, str]) -> _Reply:
        der = bytes.fromhex(self._layout["root_ca_crl"])
        return _Reply(200, _encode_crl(der, self.misbehaviour.root_crl_as))

    def _send(self, handler: BaseHTTPRequestHandler, reply: _Reply) -> None:
        m = self.misbehaviour
        body = (
            reply.body[: len(reply.body) // 2] if m.truncate_json and reply.is_json else reply.body
        )
        sent = body[: len(body) // 2] if m.short_body else body
        handler.send_response(reply.status)
        for name, value in reply.headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(sent)
        handler.close_connection = True


def _ca_of(cn: str) -> str | None:
    return next((ca for suffix, ca in PCK_CA_TYPES.items() if cn.endswith(suffix)), None)


def _encode_crl(der: bytes, encoding: str) -> bytes:
    if encoding == "der":
        return der
    if encoding == "hex":
        return der.hex().encode("ascii")
    return x509.load_der_x509_crl(der).public_bytes(Encoding.PEM)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # http.server's naming
        self.server.pccs.handle(self)  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: tests read `LoopbackPccs.requests` instead."""
