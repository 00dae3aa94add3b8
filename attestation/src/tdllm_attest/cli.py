"""`tdllm-verify`: verification of a TDX quote, for users of the appliance.

Collateral comes from a file (`--collateral`, offline) or from a PCCS / Intel PCS (`--pccs`, cached
on disk; `--at` pins the time for the cache as for the verification).

Exit codes (one per failure class; docs/attestation.md): 0 all checks passed, 1 internal error,
2 usage / unreadable input, 3 quote parse, 4 signature or chain, 5 collateral, 6 TCB status,
7 policy mismatch (measurements, TD attributes, event logs), 8 REPORTDATA binding,
9 policy document invalid or badly signed.

This is the only place that reads the clock (`--at` defaults to now); the library takes `now=`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from tdllm_attest import errors
from tdllm_attest.binding import check_report_data, expected_report_data
from tdllm_attest.cli_options import pccs_source
from tdllm_attest.collateral import CollateralSource, load_collateral
from tdllm_attest.errors import AttestationError, PolicyMismatch
from tdllm_attest.eventlog import Event, parse_ccel_log, parse_ccel_table, parse_runtime_log
from tdllm_attest.pccs import (
    PccsCollateralSource,
)
from tdllm_attest.policy import check_tcb, check_td_baseline, validate
from tdllm_attest.policy_format import Policy, TcbPolicy, load_policy, load_public_key
from tdllm_attest.trust import TrustAnchor
from tdllm_attest.verify import CheckResult, VerificationProgress, VerifiedQuote, verify_quote

NOT_CHECKED_BANNER = (
    "WARNING: NO POLICY GIVEN - MEASUREMENTS (MRTD, RTMR0-3, MRCONFIGID, MROWNER, XFAM) WERE "
    "NOT CHECKED. Only the platform (genuine TDX, TCB status, baseline TD attributes) was verified."
)


@dataclass
class _Run:
    progress: VerificationProgress = field(default_factory=VerificationProgress)
    verified: VerifiedQuote | None = None
    error: AttestationError | None = None
    measurements_checked: bool = False


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise click.UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _parse_at(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time", param_hint="--at") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _parse_report_data(value: str | None) -> bytes | None:
    if value is None:
        return None
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
        expected_report_data(raw)
    except (ValueError, AttestationError):
        raise click.BadParameter(
            "want hex, at most 64 bytes (shorter values are zero-padded)",
            param_hint="--report-data",
        ) from None
    return raw


def _collateral_from(
    path: Path | None, pccs_url: str | None, cache_dir: Path | None, at: datetime
) -> Path | PccsCollateralSource:
    """The collateral file, or a cached PCCS source whose clock is `--at` (exactly one given)."""
    if pccs_url is None:
        if path is None or not path.is_file():
            raise click.UsageError(f"cannot read collateral {path}: no such file")
        return path
    return pccs_source(pccs_url, cache_dir, now=lambda: at)


def _step(run: _Run, name: str, check: Any) -> None:
    run.progress.run(name, check)


def _evaluate(
    run: _Run,
    quote: bytes,
    collateral_from: Path | CollateralSource,
    policy: Policy | None,
    at: datetime,
    report_data: bytes | None,
    ccel_events: list[Event] | None,
    runtime_events: list[Event] | None,
) -> None:
    collateral = (
        load_collateral(collateral_from) if isinstance(collateral_from, Path) else collateral_from
    )
    limits = policy.freshness_limits() if policy else None
    verified = verify_quote(
        quote,
        collateral,
        now=at,
        anchor=TrustAnchor.intel(),
        limits=limits,
        progress=run.progress,
    )
    run.verified = verified
    tcb = policy.tcb if policy else TcbPolicy()
    _step(run, "TCB status accepted", lambda: check_tcb(verified, tcb))
    if policy is None:
        _step(run, "TD attributes (baseline)", lambda: check_td_baseline(verified))
    else:
        _step(
            run,
            f"reference values (policy {policy.name!r})",
            lambda: validate(
                verified, policy, ccel_events=ccel_events, runtime_events=runtime_events
            ),
        )
        run.measurements_checked = True
    if report_data is not None:
        _step(run, "REPORTDATA binding", lambda: check_report_data(verified, report_data))


def _summary(run: _Run) -> dict[str, Any]:
    v = run.verified
    out: dict[str, Any] = {
        "ok": run.error is None,
        "exit_code": run.error.exit_code if run.error else errors.EXIT_OK,
        "error": str(run.error) if run.error else None,
        "error_class": type(run.error).__name__ if run.error else None,
        "measurements_checked": run.measurements_checked,
        "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in _checks(run)],
    }
    if isinstance(run.error, PolicyMismatch):
        out["mismatches"] = [
            {"field": m.field, "found": m.found, "expected": m.expected}
            for m in run.error.mismatches
        ]
    if v is not None:
        out["tcb"] = {
            "status": v.tcb_status,
            "platform_status": v.platform_tcb_status,
            "qe_status": v.qe_tcb_status,
            "advisory_ids": list(v.advisory_ids),
            "tcb_date": v.tcb_date,
            "tcb_evaluation_data_number": v.tcb_evaluation_data_number,
            "fmspc": v.fmspc,
        }
        out["quote"] = {"version": v.quote.header.version, "body_type": v.quote.body_type}
        out["registers"] = {k: b.hex() for k, b in v.quote.td_report.registers().items()}
        out["anchor_sha256"] = v.anchor_sha256
        out["verified_at"] = v.verified_at.isoformat()
    return out


def _checks(run: _Run) -> list[CheckResult]:
    return list(run.progress.checks)


def _print_text(run: _Run) -> None:
    for c in _checks(run):
        mark = "PASS" if c.passed else "FAIL"
        click.echo(f"[{mark}] {c.name}" + (f": {c.detail}" if c.detail else ""))
    if isinstance(run.error, PolicyMismatch):
        for m in run.error.mismatches:
            click.echo(f"    - {m}")
    v = run.verified
    if v is not None:
        click.echo(
            f"TCB status: {v.tcb_status} (platform {v.platform_tcb_status}, "
            f"QE {v.qe_tcb_status}), TCB date {v.tcb_date}, "
            f"evaluation data number {v.tcb_evaluation_data_number}, FMSPC {v.fmspc}"
        )
        click.echo(f"Advisories: {', '.join(v.advisory_ids) or 'none'}")
        click.echo(f"Quote v{v.quote.header.version}, body type {v.quote.body_type}; registers:")
        for name, value in v.quote.td_report.registers().items():
            click.echo(f"  {name:16} {value.hex()}")
    if not run.measurements_checked:
        click.echo(NOT_CHECKED_BANNER)
    if run.error is None:
        click.echo("RESULT: PASS")
    else:
        click.echo(f"RESULT: FAIL ({type(run.error).__name__}, exit {run.error.exit_code})")


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit codes: 0 ok, 1 internal, 2 usage, 3 parse, 4 signature/chain, 5 collateral, "
    "6 TCB, 7 policy mismatch, 8 binding, 9 policy document.",
)
@click.argument("quote", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--collateral",
    type=click.Path(path_type=Path, dir_okay=False),
    help="DCAP collateral (dcap-qvl JSON layout). Exactly one of --collateral / --pccs.",
)
@click.option(
    "--pccs",
    "pccs_url",
    metavar="URL",
    help="Fetch collateral from this PCCS / Intel PCS (API v4), e.g. https://pccs.example:8081.",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Collateral cache for --pccs (default ~/.cache/tdllm/collateral).",
)
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Signed reference-values policy (JSON envelope).",
)
@click.option(
    "--policy-key",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Ed25519 public key (PEM) that signed the policy.",
)
@click.option(
    "--at",
    "at_text",
    metavar="ISO8601",
    help="Verification time (default: now; naive times are UTC).",
)
@click.option("--report-data", metavar="HEX", help="Expected REPORTDATA (<= 64 bytes).")
@click.option(
    "--ccel-table",
    type=click.Path(path_type=Path, dir_okay=False),
    help="ACPI CCEL table; replayed against RTMR0-2 (with --ccel-data).",
)
@click.option(
    "--ccel-data", type=click.Path(path_type=Path, dir_okay=False), help="CCEL event log area."
)
@click.option(
    "--runtime-log",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Runtime RTMR3 event log (JSON) for a policy with rtmr3 = event_log.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def verify_command(
    quote: Path,
    collateral: Path | None,
    pccs_url: str | None,
    cache_dir: Path | None,
    policy_path: Path | None,
    policy_key: Path | None,
    at_text: str | None,
    report_data: str | None,
    ccel_table: Path | None,
    ccel_data: Path | None,
    runtime_log: Path | None,
    as_json: bool,
) -> None:
    """Verify a TDX QUOTE: platform (DCAP), TCB status, and reference values."""
    if (collateral is None) == (pccs_url is None):
        raise click.UsageError("give exactly one of --collateral FILE or --pccs URL")
    if cache_dir is not None and pccs_url is None:
        raise click.UsageError("--cache-dir is only used with --pccs")
    if (policy_path is None) != (policy_key is None):
        raise click.UsageError("--policy and --policy-key must be given together")
    if (ccel_table is None) != (ccel_data is None):
        raise click.UsageError("--ccel-table and --ccel-data must be given together")
    if policy_path is None and (ccel_table or runtime_log):
        raise click.UsageError("--ccel-*/--runtime-log are checked against a policy: add --policy")
    at = _parse_at(at_text)
    expected = _parse_report_data(report_data)
    quote_bytes = _read_bytes(quote, "quote")
    source = _collateral_from(collateral, pccs_url, cache_dir, at)
    run = _Run()
    try:
        policy = None
        if policy_path is not None and policy_key is not None:
            key = load_public_key(_read_bytes(policy_key, "policy key"))
            policy = load_policy(_read_bytes(policy_path, "policy").decode("utf-8", "replace"), key)
        ccel_events = None
        if ccel_table is not None and ccel_data is not None:
            parse_ccel_table(_read_bytes(ccel_table, "CCEL table"))
            ccel_events = parse_ccel_log(_read_bytes(ccel_data, "CCEL data"))
        runtime_events = None
        if runtime_log is not None:
            text = _read_bytes(runtime_log, "runtime log").decode("utf-8", "replace")
            runtime_events = parse_runtime_log(text)
        _evaluate(run, quote_bytes, source, policy, at, expected, ccel_events, runtime_events)
    except AttestationError as exc:
        run.error = exc
    finally:
        if isinstance(source, PccsCollateralSource):
            source.client.close()
    if as_json:
        click.echo(json.dumps(_summary(run), indent=2))
    else:
        _print_text(run)
    if as_json and not run.measurements_checked:
        click.echo(NOT_CHECKED_BANNER, err=True)
    sys.exit(run.error.exit_code if run.error else errors.EXIT_OK)


class QuoteUnlessSubcommand(click.Group):
    """`tdllm-verify QUOTE ...` stays the quote check (a first argument that names no
    subcommand goes to `quote`); `tdllm-verify receipt ...` checks a receipt."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["quote", *args]
        return super().parse_args(ctx, args)


def verify_group() -> click.Group:
    """The `tdllm-verify` command: `quote` (the default) and `receipt`."""
    from tdllm_attest.receipt_cli import receipt_command  # it imports this module

    return QuoteUnlessSubcommand(
        "tdllm-verify",
        commands={"quote": verify_command, "receipt": receipt_command},
        context_settings={"help_option_names": ["-h", "--help"]},
        help="Verify a TDX QUOTE (the default: tdllm-verify QUOTE ...), or a tdllm answer's "
        "receipt (tdllm-verify receipt RECEIPT --attestation DOC ...).",
    )


def main() -> None:
    """Console-script entry point; any unexpected error is one line and exit 1, no traceback."""
    try:
        verify_group().main(prog_name="tdllm-verify", standalone_mode=True)
    except SystemExit:
        raise
    except Exception as exc:  # last resort: users must never see a traceback
        click.echo(f"tdllm-verify: internal error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(errors.EXIT_INTERNAL)
