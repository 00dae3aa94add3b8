"""tdllm-verify: exit code per failure class, clear one-line messages, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tdllm_attest import errors
from tdllm_attest.cli import NOT_CHECKED_BANNER, verify_command
from tdllm_attest.policy_format import sign_policy
from tdllm_attest.trust import TrustAnchor
from tdllm_attest.verify import verify_quote
from tests.attestation.attest_mutations import Vector, put

V4_AT = "2025-06-19T12:00:00Z"
VENV_BIN = Path(sys.executable).parent


def run(*args: str | Path) -> Any:
    return CliRunner().invoke(verify_command, [str(a) for a in args])


@pytest.fixture(scope="module")
def signed_policy(
    tmp_path_factory: pytest.TempPathFactory, v4: Vector, intel_anchor: TrustAnchor
) -> tuple[Path, Path, dict[str, Any], Ed25519PrivateKey]:
    r = verify_quote(v4.quote, v4.collateral, now=v4.at, anchor=intel_anchor).quote.td_report
    doc: dict[str, Any] = {
        "schema": "tdllm-attest-policy/1",
        "name": "v4 sample",
        "tcb": {"accepted_statuses": ["UpToDate"]},
        "xfam": [r.xfam.hex()],
        "measurements": [
            {
                "mr_td": r.mr_td.hex(),
                "rtmr0": r.rtmr[0].hex(),
                "rtmr1": r.rtmr[1].hex(),
                "rtmr2": r.rtmr[2].hex(),
            }
        ],
        "mr_config_id": "00" * 48,
        "mr_owner": "00" * 48,
        "mr_owner_config": "00" * 48,
        "rtmr3": "zero",
    }
    key = Ed25519PrivateKey.generate()
    d = tmp_path_factory.mktemp("policy")
    (d / "policy.json").write_text(sign_policy(doc, key))
    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    (d / "policy.pub").write_bytes(pem)
    return d / "policy.json", d / "policy.pub", doc, key


def quote_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "quote.bin"
    path.write_bytes(data)
    return path


def test_platform_only_run_passes_and_says_loudly_that_measurements_were_not_checked(
    tdx_vectors: Path, v4: Vector
) -> None:
    result = run(tdx_vectors / v4.name, "--collateral", v4.collateral_path, "--at", V4_AT)
    assert result.exit_code == 0, result.output
    assert NOT_CHECKED_BANNER in result.output
    assert "[PASS] quote signed by the attestation key" in result.output
    assert "TCB status: UpToDate" in result.output
    assert "Advisories: none" in result.output
    for register in ("mr_td", "rtmr0", "rtmr3", "report_data", "xfam", "mr_config_id"):
        assert f"  {register} " in result.output
    assert "RESULT: PASS" in result.output


def test_full_run_with_signed_policy_and_report_data_passes(
    tdx_vectors: Path, v4: Vector, signed_policy: tuple[Path, Path, dict[str, Any], Any]
) -> None:
    policy, key, _, _ = signed_policy
    report_data = "9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9"
    report_data += "eca3efdbb481601c163cf52493d6e44aed55d51ec39b7e518fadb92c2b523f20"
    result = run(
        tdx_vectors / v4.name,
        "--collateral",
        v4.collateral_path,
        "--at",
        V4_AT,
        "--policy",
        policy,
        "--policy-key",
        key,
        "--report-data",
        report_data,
    )
    assert result.exit_code == 0, result.output
    assert NOT_CHECKED_BANNER not in result.output
    assert "[PASS] REPORTDATA binding" in result.output


def test_json_output_lists_checks_registers_and_tcb(tdx_vectors: Path, v4: Vector) -> None:
    result = run(tdx_vectors / v4.name, "--collateral", v4.collateral_path, "--at", V4_AT, "--json")
    assert result.exit_code == 0
    out = json.loads(result.stdout)
    assert out["ok"] is True and out["measurements_checked"] is False
    assert out["tcb"]["status"] == "UpToDate"
    assert out["registers"]["mr_td"].startswith("91eb2b44")
    assert all(c["passed"] for c in out["checks"])


def _exit_cases() -> list[tuple[str, int]]:
    return [
        ("usage: policy without key", errors.EXIT_USAGE),
        ("usage: bad --at", errors.EXIT_USAGE),
        ("usage: bad --report-data", errors.EXIT_USAGE),
        ("usage: missing quote file", errors.EXIT_USAGE),
        ("parse: garbage quote", errors.EXIT_PARSE),
        ("signature: MRTD byte changed", errors.EXIT_SIGNATURE),
        ("collateral: real current date", errors.EXIT_COLLATERAL),
        ("collateral: not JSON", errors.EXIT_COLLATERAL),
        ("tcb: no matching TCB level", errors.EXIT_TCB),
        ("policy: measurement mismatch", errors.EXIT_POLICY),
        ("binding: other report data", errors.EXIT_BINDING),
        ("policy document: tampered", errors.EXIT_POLICY_DOCUMENT),
    ]


@pytest.mark.parametrize(("name", "code"), _exit_cases(), ids=[c[0] for c in _exit_cases()])
def test_exit_code_names_the_failure_class(
    tmp_path: Path,
    tdx_vectors: Path,
    v4: Vector,
    v5_no_tcb_match: Vector,
    signed_policy: tuple[Path, Path, dict[str, Any], Ed25519PrivateKey],
    name: str,
    code: int,
) -> None:
    policy, key, doc, signer = signed_policy
    q4 = tdx_vectors / v4.name
    base = ["--collateral", v4.collateral_path, "--at", V4_AT]
    args: list[str | Path]
    if name == "usage: policy without key":
        args = [q4, *base, "--policy", policy]
    elif name == "usage: bad --at":
        args = [q4, "--collateral", v4.collateral_path, "--at", "yesterday"]
    elif name == "usage: bad --report-data":
        args = [q4, *base, "--report-data", "zz"]
    elif name == "usage: missing quote file":
        args = [tmp_path / "nope.bin", *base]
    elif name == "parse: garbage quote":
        args = [quote_file(tmp_path, b"\x04\x00garbage"), *base]
    elif name == "signature: MRTD byte changed":
        args = [quote_file(tmp_path, put(v4.quote, 0xB8, b"\x00")), *base]
    elif name == "collateral: real current date":
        args = [q4, "--collateral", v4.collateral_path, "--at", "2026-11-23T00:00:00Z"]
    elif name == "collateral: not JSON":
        bad = tmp_path / "col.json"
        bad.write_text("{not json")
        args = [q4, "--collateral", bad, "--at", V4_AT]
    elif name == "tcb: no matching TCB level":
        args = [
            tdx_vectors / v5_no_tcb_match.name,
            "--collateral",
            v5_no_tcb_match.collateral_path,
            "--at",
            "2026-02-18T12:00:00Z",
        ]
    elif name == "policy: measurement mismatch":
        other = json.loads(json.dumps(doc))
        other["measurements"][0]["mr_td"] = "11" * 48
        other["mr_owner"] = "22" * 48
        path = tmp_path / "other.json"
        path.write_text(sign_policy(other, signer))
        args = [q4, *base, "--policy", path, "--policy-key", key]
    elif name == "binding: other report data":
        args = [q4, *base, "--report-data", "00" * 64]
    else:  # policy document: tampered
        envelope = json.loads(policy.read_text())
        envelope["policy"]["tcb"]["accepted_statuses"].append("OutOfDate")
        path = tmp_path / "tampered.json"
        path.write_text(json.dumps(envelope))
        args = [q4, *base, "--policy", path, "--policy-key", key]
    result = run(*args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    if name == "policy: measurement mismatch":
        assert "mr_td: found 91eb2b44" in result.output
        assert "mr_owner: found 0000" in result.output


def test_installed_console_script_reports_exit_codes_without_traceback(
    tmp_path: Path, tdx_vectors: Path, v4: Vector
) -> None:
    exe = VENV_BIN / "tdllm-verify"
    if not exe.exists():
        pytest.skip(f"{exe} is not installed")
    ok = subprocess.run(
        [exe, tdx_vectors / v4.name, "--collateral", v4.collateral_path, "--at", V4_AT],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "RESULT: PASS" in ok.stdout
    garbage = quote_file(tmp_path, b"not a quote")
    bad = subprocess.run(
        [exe, garbage, "--collateral", v4.collateral_path, "--at", V4_AT],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == errors.EXIT_PARSE
    assert "Traceback" not in bad.stdout + bad.stderr
    assert "[FAIL] quote framing" in bad.stdout
