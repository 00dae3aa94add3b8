"""`tdllm attack --all --write-docs`: the table is written from what the attacks measured."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tdllm.model.checkpoint import Checkpoint
from tdllm_lab.attacks import a1_private_bytes as a1
from tdllm_lab.attacks import a8_prompt_recovery as a8
from tdllm_lab.attacks.registry import ATTACKS
from tdllm_lab.attacks.result import AttackOptions, AttackResult
from tdllm_lab.attacks.suite import SECTION, SUITE, evidence, format_section, run_suite, verdict
from tdllm_lab.doc_sections import markers, replace_marked
from tests.protection.conftest import K

MACHINE = {"cpu": "Test CPU", "cores": 2, "torch": "2.x"}
TDLLM = str(Path(sys.executable).with_name("tdllm"))


def _tdllm(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # our own CLI, fixed argv
        [TDLLM, *argv], capture_output=True, text=True, timeout=120, check=False
    )


def _doc(tmp_path: Path) -> Path:
    begin, end = markers(SECTION)
    doc = tmp_path / "security.md"
    doc.write_text(f"# intro\n\n{begin}\nold table\n{end}\n\noutro\n")
    return doc


def test_every_suite_entry_names_a_registered_attack() -> None:
    assert {name for name, _ in SUITE} == set(ATTACKS)
    assert len(set(SUITE)) == len(SUITE)


def test_a_suite_run_writes_its_measured_row_between_the_markers(tmp_path: Path) -> None:
    rows = run_suite([("A14", "masked")], AttackOptions("all", quick=True))
    (row,) = rows
    assert row.result.attack == "A14" and row.result.profile == "masked"
    assert row.result.detail["trials"] == 700
    doc = _doc(tmp_path)
    now = datetime(2026, 11, 29, tzinfo=UTC)
    replace_marked(doc, SECTION, format_section(rows, "tdllm attack --all", MACHINE, now))
    text = doc.read_text()
    assert text.startswith("# intro\n") and text.endswith("\n\noutro\n")
    assert "old table" not in text
    undetected = row.result.detail["undetected_total"]
    assert "| A14 | `masked` |" in text
    assert f"{undetected} undetected of 700 forgeries" in text
    assert "2026-11-29" in text and "Test CPU" in text
    assert ("| holds |" in text) == row.result.passed


def test_evidence_and_verdict_come_from_the_measured_detail(
    tiny_pair: tuple[Checkpoint, Checkpoint],
) -> None:
    # masked's pads make each nearest-neighbour guess a 1-in-97 draw: over 30 tokens, 2 chance
    # hits (6.7% > the 5% threshold) came in 12 of 200 runs (a CI run met one); over 300 the
    # threshold is 16 hits against a mean of 3.1 (P ~ 1e-7; 0 of 100 runs, the largest 2.7%)
    prompts = [[(5 * i + 11 * j) % 97 for j in range(30)] for i in range(1, 11)]
    for profile in ("split", "masked"):
        detail = _a8_on_tiny(profile, tiny_pair, prompts)
        if profile == "split":
            detail["claim"] = "split does not hide prompts"
        rate = detail["nearest_neighbour_recovery"]
        result = AttackResult("A8", profile, "rate", rate, rate <= a8.THRESHOLD, detail)
        assert f"of {detail['prompt_tokens']} prompt tokens" in evidence(result)
        expected = "holds" if profile == "masked" else "not protected (by design)"
        assert verdict(result) == expected
    broken = AttackResult("A2", "obfuscated", "rows", 1.0, False, {})
    assert verdict(broken) == "**broken**"


def _a8_on_tiny(
    profile: str, pair: tuple[Checkpoint, Checkpoint], prompts: list[list[int]]
) -> dict[str, Any]:
    target = a1.open_target(profile, "cpu", *pair, K, 32)
    try:
        return a8.measure(target, prompts)
    finally:
        target.close()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["attack", "A1", "--all"], "give no NAME or --profile"),
        (["attack", "--all", "--profile", "masked"], "give no NAME or --profile"),
        (["attack", "A1", "--profile", "split", "--write-docs", "x.md"], "use it with --all"),
        (["attack", "A1"], "give an attack NAME and --profile"),
        (["attack", "A99", "--profile", "split"], "unknown attack 'A99'"),
    ],
)
def test_attack_cli_rejects_bad_combinations_in_one_line(argv: list[str], message: str) -> None:
    result = _tdllm(*argv)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_write_docs_refuses_a_doc_without_the_section_before_measuring(tmp_path: Path) -> None:
    doc = tmp_path / "plain.md"
    doc.write_text("# no markers here\n")
    result = _tdllm("attack", "--all", "--write-docs", str(doc))
    assert result.returncode != 0
    assert "has no <!-- attack-suite:begin -->" in result.stderr
    assert "[1/" not in result.stderr  # nothing was run
    assert doc.read_text() == "# no markers here\n"
