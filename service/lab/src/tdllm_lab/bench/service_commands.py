"""`tdllm bench serve` and `tdllm bench soak`: the service under streaming clients, one engine at
a time or for minutes with disconnects and malformed bodies."""

from __future__ import annotations

import json
import os

import click

from tdllm.cli import DTYPE, QUANT, status
from tdllm.errors import UsageError


@click.command("serve")
@click.option("--url", default=None, help="a running service (default: start one on loopback)")
@click.option(
    "--engine",
    "engines",
    default=None,
    help="compare engines side by side, one at a time: any of "
    + ",".join(["tdllm", *(f"tdllm-{q}" for q in QUANT.choices if q != "none"), "vllm"])
    + ",vllm-alone (tdllm-QUANT: our engine with that quant; vllm-alone: vLLM's server as the "
    "service starts it, with no front); not with --url",
)
@click.option("--clients", "client_counts", default="1,4,8", show_default=True)
@click.option("--requests-per-client", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1, 1024), default=64, show_default=True)
@click.option("--model", default="bundled", show_default=True, help="with --engine")
@click.option("--dtype", type=DTYPE, default="bf16", show_default=True, help="with --engine")
@click.option(
    "--max-batch",
    type=click.IntRange(1, 256),
    default=None,
    help="with --engine; default the largest client count",
)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def bench_serve(
    url: str | None,
    engines: str | None,
    client_counts: str,
    requests_per_client: int,
    max_tokens: int,
    model: str,
    dtype: str,
    max_batch: int | None,
    as_json: bool,
) -> None:
    """Aggregate tokens/s and TTFT p50/p95/p99 for 1, 4, 8 concurrent streaming clients.

    With --engine, per engine and client count also the peak RSS of the server's process tree,
    with ratios against vllm-alone (the front's cost) and tdllm. The vLLM engines need
    TDLLM_VLLM_PYTHON or .venv-vllm/bin/python here (`make vllm`).
    """
    from tdllm_lab.bench.serve import (
        format_engines_report,
        format_report,
        parse_counts,
        parse_engines,
        run_engines_bench,
        run_serve_bench,
    )

    counts = parse_counts(client_counts)
    if engines is None:
        report = run_serve_bench(url, counts, requests_per_client, max_tokens)
        click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
        return
    if url is not None:
        raise UsageError("--engine starts each engine itself: leave out --url")
    chosen = parse_engines(engines)
    report = run_engines_bench(
        chosen,
        counts,
        requests_per_client,
        max_tokens,
        model=model,
        dtype=dtype,
        max_batch=max_batch,
        progress=status,
    )
    click.echo(json.dumps(report, indent=2) if as_json else format_engines_report(report))


@click.command("soak")
@click.option(
    "--url", default=None, help="a service on this machine (default: start one on loopback)"
)
@click.option("--clients", type=click.IntRange(1, 256), default=32, show_default=True)
@click.option("--minutes", type=click.FloatRange(0.05, 120), default=10.0, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1, 1024), default=64, show_default=True)
@click.option("--disconnect-fraction", type=click.FloatRange(0, 1), default=0.10, show_default=True)
@click.option("--malformed-fraction", type=click.FloatRange(0, 1), default=0.05, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--ramp-s",
    type=click.FloatRange(0, 600),
    default=10.0,
    show_default=True,
    help="clients start evenly over this many seconds",
)
@click.option(
    "--warm-up-s",
    type=click.FloatRange(0, 600),
    default=0.0,
    show_default=True,
    help="run the same load this long before measuring (RSS drift then shows leaks, not warm-up)",
)
@click.option("--model", default="bundled", show_default=True, help="for the loopback service")
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16"]),
    default=None,
    help="for the loopback service (default: the service's)",
)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def bench_soak(
    url: str | None,
    clients: int,
    minutes: float,
    max_tokens: int,
    disconnect_fraction: float,
    malformed_fraction: float,
    seed: int,
    ramp_s: float,
    warm_up_s: float,
    model: str,
    dtype: str | None,
    as_json: bool,
) -> None:
    """Streaming clients for minutes, some disconnecting early, some sending malformed bodies.

    Reports requests and errors by class, cut streams, tok/s, TTFT p50/p99, the service's RSS
    (start/end/max) and /ready after. Loopback only; the started service gets one KV slot per
    client. The API key, when --url wants one, comes from TDLLM_API_KEY.
    """
    from tdllm_lab.bench.soak import SoakConfig, format_report, run_soak

    if disconnect_fraction + malformed_fraction > 1:
        raise UsageError("--disconnect-fraction plus --malformed-fraction must be at most 1")
    config = SoakConfig(
        clients,
        minutes,
        max_tokens,
        disconnect_fraction,
        malformed_fraction,
        seed,
        ramp_s,
        warm_up_s,
        api_key=os.environ.get("TDLLM_API_KEY") or None,
    )
    service = {"model": model} | ({"dtype": dtype} if dtype else {})
    report = run_soak(url, config, lambda line: click.echo(line, err=True), service)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
