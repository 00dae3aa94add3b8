"""`tdllm bench serve --engine ...`: option parsing and the side-by-side table (no vLLM needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tdllm.errors import UsageError
from tdllm.vllm_engine.child import VllmLaunch, VllmProcess
from tdllm_lab.bench.commands import bench
from tdllm_lab.bench.serve import (
    format_engines_report,
    parse_counts,
    parse_engines,
    vllm_python,
)


def test_engines_parse_in_order_once_each() -> None:
    assert parse_engines("tdllm, vllm,vllm-alone,tdllm") == ["tdllm", "vllm", "vllm-alone"]
    assert parse_engines("vllm-alone") == ["vllm-alone"]
    assert parse_engines("tdllm,tdllm-w8a8,tdllm-int4") == ["tdllm", "tdllm-w8a8", "tdllm-int4"]
    with pytest.raises(UsageError, match="unknown engine 'hf'"):
        parse_engines("tdllm,hf")
    with pytest.raises(UsageError):
        parse_engines(" , ")


def test_the_engine_help_names_every_engine() -> None:
    from tdllm_lab.bench.serve import ENGINES
    from tdllm_lab.bench.service_commands import bench_serve

    option = next(p for p in bench_serve.params if p.name == "engines")
    assert option.help is not None
    listed = option.help.split("any of ")[1].split(" ")[0].split(",")
    assert listed == list(ENGINES)


def test_client_counts_parse() -> None:
    assert parse_counts("1,8,32") == [1, 8, 32]
    for bad in ("1,x", "0", ""):
        with pytest.raises(UsageError):
            parse_counts(bad)


def test_vllm_python_from_environment_or_the_repository(tmp_path: Path) -> None:
    python = tmp_path / ".venv-vllm" / "bin" / "python"
    with pytest.raises(UsageError, match="make vllm"):
        vllm_python({}, cwd=tmp_path)
    python.parent.mkdir(parents=True)
    python.touch()
    assert vllm_python({}, cwd=tmp_path) == python
    assert vllm_python({"TDLLM_VLLM_PYTHON": str(python)}, cwd=Path("/")) == python
    with pytest.raises(UsageError, match="does not exist"):
        vllm_python({"TDLLM_VLLM_PYTHON": str(tmp_path / "nope")}, cwd=tmp_path)


def test_a_missing_vllm_python_is_a_one_line_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TDLLM_VLLM_PYTHON", raising=False)
    result = CliRunner().invoke(bench, ["serve", "--engine", "tdllm,vllm", "--clients", "1"])
    assert isinstance(result.exception, UsageError)
    assert result.exception.exit_code == 2


def test_engine_and_url_do_not_mix() -> None:
    result = CliRunner().invoke(bench, ["serve", "--engine", "tdllm", "--url", "http://x"])
    assert isinstance(result.exception, UsageError)


def _level(clients: int, tok_s: float, p50: float, rss: float) -> dict[str, float]:
    return {
        "clients": clients,
        "requests": clients,
        "completion_tokens": clients * 64,
        "wall_s": 1.0,
        "tokens_per_s": tok_s,
        "ttft_p50_s": p50,
        "ttft_p95_s": p50,
        "ttft_p99_s": p50 * 2,
        "peak_rss_mib": rss,
        "pss_mib": rss / 2,
        "processes": 3,
    }


def _rows(table: str) -> dict[str, list[list[str]]]:
    """engine -> [its columns, ratios vs vllm-alone, ratios vs tdllm] for each data row."""
    rows = {}
    for line in table.splitlines():
        if line.split()[0].isdigit():
            parts = [part.split() for part in line.split("|")]
            rows[parts[0][1]] = parts
    return rows


def _report(*engines: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "m",
        "dtype": "bf16",
        "max_batch": 8,
        "max_tokens": 64,
        "requests_per_client": 2,
        "rss": "psutil",
        "engines": list(engines),
    }


def test_the_table_gives_ratios_against_vllm_alone_and_tdllm() -> None:
    report = _report(
        {"engine": "tdllm", "start_s": 5.0, "levels": [_level(1, 10.0, 0.2, 500.0)]},
        {"engine": "vllm", "start_s": 90.0, "levels": [_level(1, 18.0, 0.3, 2000.0)]},
        {"engine": "vllm-alone", "start_s": 80.0, "levels": [_level(1, 20.0, 0.25, 1600.0)]},
    )
    rows = _rows(format_engines_report(report))
    assert list(rows) == ["tdllm", "vllm", "vllm-alone"]
    # vllm vs vllm-alone (the front's cost): 18/20 tok/s, 0.3/0.25 TTFT, 2000/1600 RSS
    assert rows["vllm"][1] == ["0.90x", "1.20x", "1.25x"]
    # vllm vs tdllm: 18/10, 0.3/0.2, 2000/500
    assert rows["vllm"][2] == ["1.80x", "1.50x", "4.00x"]
    assert rows["vllm-alone"][1] == ["1.00x", "1.00x", "1.00x"]
    assert rows["tdllm"][0][:5] == ["1", "tdllm", "10.0", "0.2s", "0.4s"]


def test_the_table_without_a_baseline_says_so() -> None:
    report = _report({"engine": "tdllm", "start_s": 5.0, "levels": [_level(8, 40.0, 1.0, 600.0)]})
    row = _rows(format_engines_report(report))["tdllm"]
    assert row[1] == ["-", "-", "-"]
    assert row[2] == ["1.00x", "1.00x", "1.00x"]


def test_vllm_alone_listens_on_loopback_tcp_not_the_socket(tmp_path: Path) -> None:
    launch = VllmLaunch(Path("/py"), "src", "name", "bf16", 2048, 8, tcp_port=4321)
    command = VllmProcess(launch, run_dir=tmp_path)._command(tmp_path / "model", {}, False, 7)
    assert "--uds" not in command
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--port") + 1] == "4321"
    service = VllmProcess(VllmLaunch(Path("/py"), "src", "name", "bf16", 2048, 8), run_dir=tmp_path)
    plain = service._command(tmp_path / "model", {}, False, 7)
    assert "--host" not in plain and "--port" not in plain
    assert plain[plain.index("--uds") + 1] == service.socket_path
