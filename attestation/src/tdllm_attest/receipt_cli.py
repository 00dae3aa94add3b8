"""`tdllm-verify receipt RECEIPT --attestation DOC`: check a tdllm answer's receipt offline.

RECEIPT is the receipt (``{"receipt", "signature"}``) or the answer that carries it as kept: a
JSON body, a JSON list of a stream's event payloads, or the raw ``data:`` lines of a stream.
DOC is the service's receipt attestation (GET /v1/attestation/receipts) of the same boot. Each
check prints ``[PASS]``/``[FAIL]`` like the quote check; the exit code is the failure class of
the first failure (tdllm_attest.errors; docs/attestation.md).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from tdllm_attest import errors
from tdllm_attest.cli import _parse_at
from tdllm_attest.cli_options import (
    check_collateral_options,
    check_reference_options,
    own_collateral,
    own_collateral_options,
    reference_value_options,
)
from tdllm_attest.client.attest import anchor_for, load_reference_policy
from tdllm_attest.client.receipt import ReceiptRefused, VerifiedReceipt, load_kept, verify_receipt
from tdllm_attest.client.receipt_protocol import receipt_of
from tdllm_attest.errors import AttestationError
from tdllm_attest.gpu.rim import RimStore
from tdllm_attest.trust import ALLOW_SIMULATED_ENV, TrustAnchor
from tdllm_attest.verify import VerificationProgress

_FILE = click.Path(path_type=Path, dir_okay=False, exists=True)
ANY_TD_BANNER = (
    "WARNING: --insecure-any-td: the TD's identity (MRTD/RTMRs) was NOT checked; the receipt "
    "only shows that some TD on genuine hardware signed it"
)
SIMULATED_BANNER = "WARNING: SIMULATED TDX attestation: this receipt proves nothing"


@click.command(
    "receipt",
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit codes: 0 ok, 1 internal, 2 usage, 3 malformed receipt or answer, 4 signature "
    "or attestation refused, 5 collateral, 6 TCB, 7 policy mismatch, 8 binding (nonce, quote, "
    "claims, request or response digest, time), 9 policy document.",
)
@click.argument("receipt_file", metavar="RECEIPT", type=_FILE)
@click.option(
    "--attestation",
    "attestation_file",
    required=True,
    type=_FILE,
    help="the receipt attestation (GET /v1/attestation/receipts) of the boot that signed",
)
@reference_value_options
@click.option(
    "--simulated-root",
    type=_FILE,
    help=f"UNSAFE: trust this simulated TDX root (also needs {ALLOW_SIMULATED_ENV}=1)",
)
@own_collateral_options
@click.option("--request", "request_file", type=_FILE, help="the exact request body sent")
@click.option(
    "--response",
    "response_file",
    type=_FILE,
    help="the answer kept: JSON body, JSON list of stream payloads, or the stream's data: lines",
)
@click.option(
    "--at", "at_text", metavar="ISO8601", help="verification time (default: now; naive is UTC)"
)
@click.option(
    "--gpu-rims",
    "gpu_rims",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="a gpu-cc service: NVIDIA's RIMs (.swidtag) to check the GPU evidence it attested",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of text")
def receipt_command(
    receipt_file: Path,
    attestation_file: Path,
    policy_file: Path | None,
    policy_key: Path | None,
    insecure_any_td: bool,
    simulated_root: Path | None,
    pccs_url: str | None,
    cache_dir: Path | None,
    collateral_file: Path | None,
    request_file: Path | None,
    response_file: Path | None,
    at_text: str | None,
    gpu_rims: Path | None,
    as_json: bool,
) -> None:
    """Verify a receipt: the attested TD signed this answer to this request."""
    check_reference_options(policy_file, policy_key, insecure_any_td)
    check_collateral_options(pccs_url, cache_dir, collateral_file)
    at = _parse_at(at_text)
    anchor = _anchor(simulated_root)
    progress = VerificationProgress()
    verified: VerifiedReceipt | None = None
    error: AttestationError | None = None
    try:
        policy = None
        if policy_file is not None and policy_key is not None:
            policy = load_reference_policy(policy_file, policy_key)
        rims = RimStore.from_directory(gpu_rims) if gpu_rims is not None else None
        with own_collateral(pccs_url, cache_dir, collateral_file, now=lambda: at) as source:
            verified = verify_receipt(
                _receipt(receipt_file),
                _json_file(attestation_file, "the attestation document"),
                anchor=anchor,
                now=at,
                policy=policy,
                insecure_any_td=insecure_any_td,
                collateral_source=source,
                request_bytes=request_file.read_bytes() if request_file else None,
                response=_kept(response_file) if response_file else None,
                progress=progress,
                gpu_rims=rims,
            )
    except AttestationError as exc:
        error = exc
    if as_json:
        click.echo(json.dumps(_summary(progress, verified, error), indent=2))
    else:
        _print_text(progress, verified, error)
    sys.exit(_exit_code(error))


def _exit_code(error: AttestationError | None) -> int:
    if error is None:
        return errors.EXIT_OK
    if isinstance(error, ReceiptRefused):
        return error.exit_code
    cause = error.__cause__  # e.g. the policy document's own class
    return cause.exit_code if isinstance(cause, AttestationError) else error.exit_code


def _anchor(simulated_root: Path | None) -> TrustAnchor:
    allowed = os.environ.get(ALLOW_SIMULATED_ENV) == "1"
    if simulated_root is not None and not allowed:
        raise click.UsageError(f"--simulated-root also needs {ALLOW_SIMULATED_ENV}=1")
    environ = {ALLOW_SIMULATED_ENV: "1"} if allowed else {}
    try:
        return anchor_for(simulated_root.read_bytes() if simulated_root else None, environ)
    except AttestationError as exc:
        raise click.BadParameter(str(exc), param_hint="--simulated-root") from None


def _json_file(path: Path, what: str) -> Any:
    """A JSON file's value; one that does not parse is malformed evidence (exit 3)."""
    try:
        return load_kept(path.read_bytes())
    except ValueError as exc:
        raise ReceiptRefused(f"{what} is not JSON: {exc}", errors.EXIT_PARSE) from None


def _receipt(path: Path) -> Any:
    """The receipt document, whether given alone or in the answer that carries it."""
    value = _json_file(path, "RECEIPT")
    if isinstance(value, dict) and "receipt" in value:
        return value
    if isinstance(value, dict | list):
        found = receipt_of(value)
        if found is not None:
            return found
    raise ReceiptRefused(
        "RECEIPT holds no receipt (neither {receipt, signature} nor an answer carrying "
        "tdllm_receipt)",
        errors.EXIT_PARSE,
    )


def _kept(path: Path) -> dict[str, Any] | list[Any]:
    value = _json_file(path, "--response")
    if not isinstance(value, dict | list):
        raise ReceiptRefused("--response is neither an answer nor a stream", errors.EXIT_PARSE)
    return value


def _summary(
    progress: VerificationProgress, verified: VerifiedReceipt | None, error: AttestationError | None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ok": error is None,
        "exit_code": _exit_code(error),
        "error": str(error) if error else None,
        "checks": [
            {"name": c.name, "passed": c.passed, "detail": c.detail} for c in progress.checks
        ],
    }
    if verified is not None:
        out |= {
            "receipt": verified.receipt,
            "tcb_status": verified.attested.tcb_status,
            "simulated": verified.attested.simulated,
            "policy": verified.attested.policy_name,
            "request_checked": verified.request_checked,
            "response_checked": verified.response_checked,
        }
    return out


def _print_text(
    progress: VerificationProgress, verified: VerifiedReceipt | None, error: AttestationError | None
) -> None:
    for c in progress.checks:
        mark = "PASS" if c.passed else "FAIL"
        click.echo(f"[{mark}] {c.name}" + (f": {c.detail}" if c.detail and not c.passed else ""))
    if error is not None and not any(not c.passed for c in progress.checks):
        click.echo(f"[FAIL] {error}")  # failed before any named check (e.g. the policy file)
    if verified is not None:
        receipt = verified.receipt
        model = receipt["model"] or {}
        kind = "stream" if receipt["stream"] else "whole answer"
        click.echo(f"Receipt: {receipt['time']}, {receipt['endpoint']} ({kind})")
        click.echo(f"Model: {model.get('id')!r}, sealed: {json.dumps(model.get('sealed'))}")
        click.echo(
            f"Profile: {receipt['profile']}; reference values id: {receipt['reference_values_id']}"
        )
        click.echo(f"Sampling: {json.dumps(receipt['sampling'], sort_keys=True)}")
        click.echo(
            f"TCB status: stated {receipt['attestation']['tcb_status']}, verified "
            f"{verified.attested.tcb_status}"
        )
        for what, checked, option in (
            ("Request", verified.request_checked, "--request FILE"),
            ("Response", verified.response_checked, "--response FILE"),
        ):
            click.echo(f"{what}: " + ("matches" if checked else f"NOT checked (give {option})"))
        if verified.attested.simulated:
            click.echo(SIMULATED_BANNER)
        if verified.attested.policy_name is None:
            click.echo(ANY_TD_BANNER)
    if error is None:
        click.echo("RESULT: PASS")
    else:
        click.echo(f"RESULT: FAIL ({type(error).__name__}, exit {_exit_code(error)})")
