"""`tdllm-verify receipt`: per-check lines and the exit code of each failure class, next to the
quote check, which a first argument that names no subcommand still reaches unchanged."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tdllm_attest import errors
from tdllm_attest.cli import verify_group
from tdllm_attest.client.receipt_protocol import RECEIPTS_NONCE, body_sha256, sign_receipt
from tdllm_attest.testing.platform import SimulatedTdxPlatform
from tests.client.reference_policy import write_signed_policy
from tests.client.simulated_service import BODY, REQUEST, SimulatedService, receipt_fields

pytestmark = pytest.mark.filterwarnings("ignore:.*SIMULATED.*")
ENV = {"TDLLM_ALLOW_SIMULATED_TDX": "1"}


@pytest.fixture(scope="module")
def platform() -> SimulatedTdxPlatform:
    return SimulatedTdxPlatform(datetime.now(UTC))


@pytest.fixture
def files(platform: SimulatedTdxPlatform, tmp_path: Path) -> dict[str, Path]:
    """A receipted answer of a simulated TD, as its user keeps it, and what checks it."""
    service = SimulatedService(platform)
    document = service.answer(RECEIPTS_NONCE, collateral=platform.collateral_json())
    receipt = sign_receipt(receipt_fields(document, body_sha256(BODY)), service.signing_key)
    policy, key = write_signed_policy(tmp_path, platform)
    contents = {
        "answer": json.dumps(BODY | {"tdllm_receipt": receipt}).encode(),
        "attestation": json.dumps(document).encode(),
        "request": REQUEST,
        "root": platform.root_der,
        "collateral": platform.collateral_json().encode(),
    }
    out = {"policy": policy, "key": key}
    for name, data in contents.items():
        out[name] = tmp_path / name
        out[name].write_bytes(data)
    return out


def _receipt_cli(files: dict[str, Path], *extra: Any, policy: bool = True) -> Result:
    args: list[Any] = ["receipt", files["answer"], "--attestation", files["attestation"]]
    args += ["--simulated-root", files["root"]]
    if policy:
        args += ["--policy", files["policy"], "--policy-key", files["key"]]
    return CliRunner().invoke(verify_group(), [str(a) for a in [*args, *extra]], env=ENV)


def test_a_receipt_in_the_answer_kept_passes_every_check(files: dict[str, Path]) -> None:
    done = _receipt_cli(
        files,
        "--request",
        files["request"],
        "--response",
        files["answer"],
        "--collateral",
        files["collateral"],
    )
    assert done.exit_code == 0, done.output
    assert done.output.count("[PASS]") == 10 and "[FAIL]" not in done.output
    assert "RESULT: PASS" in done.output


def test_an_altered_answer_fails_the_response_digest_with_the_binding_class(
    files: dict[str, Path],
) -> None:
    altered = json.loads(files["answer"].read_text())
    altered["choices"][0]["message"]["content"] = "Goodbye"
    files["answer"].write_text(json.dumps(altered))
    done = _receipt_cli(files, "--response", files["answer"])
    assert done.exit_code == errors.EXIT_BINDING, done.output
    assert "[FAIL] response digest: receipt refused: it covers a whole answer" in done.output


def test_a_receipt_re_signed_by_another_key_fails_the_signature_class(
    files: dict[str, Path],
) -> None:
    doc = json.loads(files["answer"].read_text())
    forged = sign_receipt(doc["tdllm_receipt"]["receipt"], Ed25519PrivateKey.generate())
    files["answer"].write_text(json.dumps(doc | {"tdllm_receipt": forged}))
    done = _receipt_cli(files)
    assert done.exit_code == errors.EXIT_SIGNATURE, done.output
    assert "[FAIL] receipt signed by the attested signing key" in done.output


def test_what_is_not_json_is_malformed(files: dict[str, Path]) -> None:
    files["answer"].write_bytes(b"\x00 not json")
    done = _receipt_cli(files)
    assert done.exit_code == errors.EXIT_PARSE, done.output
    assert "RECEIPT is not JSON" in done.output


def test_a_policy_signed_by_another_key_is_the_policy_document_class(
    files: dict[str, Path],
) -> None:
    other = Ed25519PrivateKey.generate().public_key()
    files["key"].write_bytes(other.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    done = _receipt_cli(files)
    assert done.exit_code == errors.EXIT_POLICY_DOCUMENT, done.output


def test_without_reference_values_it_stops_naming_both_options(files: dict[str, Path]) -> None:
    done = _receipt_cli(files, policy=False)
    assert done.exit_code == errors.EXIT_USAGE
    assert "--policy FILE --policy-key" in done.output and "--insecure-any-td" in done.output
    anyway = _receipt_cli(files, "--insecure-any-td", policy=False)
    assert anyway.exit_code == 0, anyway.output
    assert "reference values NOT checked" in anyway.output


def test_a_first_argument_that_names_no_subcommand_is_the_quote_check(
    files: dict[str, Path], tmp_path: Path
) -> None:
    garbage = tmp_path / "quote.bin"
    garbage.write_bytes(b"not a quote")
    for args in ([garbage], ["quote", garbage], ["--json", garbage]):
        full = [str(a) for a in [*args, "--collateral", files["collateral"]]]
        done = CliRunner().invoke(verify_group(), full)
        assert done.exit_code == errors.EXIT_PARSE, done.output
        assert "quote framing" in done.output
    listing = CliRunner().invoke(verify_group(), ["--help"])
    assert listing.exit_code == 0 and "quote" in listing.output and "receipt" in listing.output
