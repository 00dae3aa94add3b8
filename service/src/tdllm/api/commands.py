"""`tdllm serve` (the appliance's REST service under gunicorn) and `tdllm bench serve`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from tdllm.errors import UsageError

CONFIG = click.Path(path_type=Path, dir_okay=False, exists=True)


def gunicorn_argv() -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", "python:tdllm.api.gunicorn_conf"]


@click.command()
@click.option("--config", "config_file", type=CONFIG, default=None, help="TOML settings file")
@click.option("--host", default=None, help="bind address (default 127.0.0.1)")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="default 8000")
@click.option("--model", default=None, help="'bundled', a .gguf, a directory or a sealed dir")
@click.option("--check", is_flag=True, help="resolve and print the settings, then exit")
def serve(
    config_file: Path | None, host: str | None, port: int | None, model: str | None, check: bool
) -> None:
    """Serve the OpenAI-compatible API (gunicorn, one worker) until stopped.

    Settings: defaults, then the TOML file (--config or TDLLM_CONFIG), then TDLLM_* variables,
    then these options. See docs/api.md.
    """
    from tdllm.settings import load_settings, service_environment

    changes = {
        k: str(v) for k, v in {"host": host, "port": port, "model": model}.items() if v is not None
    }
    env = service_environment(config_file, **changes)
    settings = load_settings(environ=env)  # fail here, with one line, not inside gunicorn
    if check:
        shown = {k: v for k, v in vars(settings).items() if k != "api_keys"}
        shown["api_keys"] = f"{len(settings.api_keys)} configured"
        click.echo(json.dumps(shown, indent=2))
        return
    argv = gunicorn_argv()
    os.execve(argv[0], argv, env)  # noqa: S606  # fixed argv; gunicorn becomes this process: systemd signals reach it


@click.command("serve")
@click.option("--url", default=None, help="a running service (default: start one on loopback)")
@click.option("--clients", "client_counts", default="1,4,8", show_default=True)
@click.option("--requests-per-client", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1, 1024), default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def bench_serve(
    url: str | None,
    client_counts: str,
    requests_per_client: int,
    max_tokens: int,
    as_json: bool,
) -> None:
    """Aggregate tokens/s and TTFT p50/p95 for 1, 4, 8 concurrent streaming clients."""
    from tdllm.api.serve_bench import format_report, run_serve_bench

    counts = [int(c) for c in client_counts.split(",") if c.strip()]
    report = run_serve_bench(url, counts, requests_per_client, max_tokens)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


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
    from tdllm.api.soak_bench import SoakConfig, format_report, run_soak

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
