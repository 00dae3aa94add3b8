"""`tdllm bench split`'s rows: which configurations run for each quant, what each row is
compared with, and the report's quant column (the timing itself is measured, not tested)."""

from __future__ import annotations

from tdllm_lab.bench.split import add_ratios, configs, format_split_report


def test_the_split_bench_runs_masked_with_a_quant_and_leaves_obfuscated_out() -> None:
    with_int4 = [("td-only", "cpu", "int4"), ("split", "cpu", "int4"), ("masked", "cpu", "int4")]
    assert configs(("cpu",), ("int4",)) == with_int4
    both = configs(("cpu",), ("none", "int4"))
    assert ("obfuscated", "cpu", "none") in both and both[-3:] == with_int4


def test_the_split_bench_compares_each_row_with_its_quants_td_only_and_with_no_quant() -> None:
    rows = [
        {"profile": "td-only", "device": "cpu", "quant": "none", "seconds": 1.0},
        {"profile": "masked", "device": "cpu", "quant": "none", "seconds": 6.0},
        {"profile": "td-only", "device": "cpu", "quant": "int4", "seconds": 0.5},
        {"profile": "masked", "device": "cpu", "quant": "int4", "seconds": 4.0},
    ]
    add_ratios(rows)
    assert [r["time_vs_td_only"] for r in rows] == [1.0, 6.0, 1.0, 8.0]
    assert rows[3]["time_vs_quant_none"] == round(4 / 6, 3)
    assert "time_vs_quant_none" not in rows[1]


def test_the_split_bench_report_names_each_rows_quant() -> None:
    row = {"device": "cpu", "median_seconds": 1.0, "tokens_per_s": 9.0, "time_vs_td_only": 1.0}
    row |= {"crossing_bytes_per_token": 0.0, "seconds": 1.0}
    report = {"model": "m", "k": 2, "prompt_tokens": 4, "new_tokens": 2, "threads": 2}
    report["rows"] = [row | {"profile": "td-only", "quant": q} for q in ("none", "w8a8-onednn")]
    lines = format_split_report(report).splitlines()
    assert "quant" in lines[1].split()
    assert lines[2].split()[2] == "none" and lines[3].split()[2] == "w8a8-onednn"
