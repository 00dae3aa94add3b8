"""`tdllm serve`: the appliance's REST service under gunicorn."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from tdllm.model.compile_modes import COMPILE_MODES
from tdllm.model.quant_formats import QUANTS

CONFIG = click.Path(path_type=Path, dir_okay=False, exists=True)


def gunicorn_argv() -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", "python:tdllm.api.gunicorn_conf"]


@click.command()
@click.option("--config", "config_file", type=CONFIG, default=None, help="TOML settings file")
@click.option("--host", default=None, help="bind address (default 127.0.0.1)")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="default 8000")
@click.option("--model", default=None, help="'bundled', a .gguf, a directory or a sealed dir")
@click.option(
    "--quant",
    type=click.Choice(QUANTS),
    default=None,
    help="weights kept int8/int4, or w8a8 (int8 weights and activations; w8a8-onednn: on "
    "oneDNN's GEMM, for batches; w8a8-avx512: on our AVX-512 kernel, for decode; "
    "w8a8-avx2: int8 weights and inputs per 32 on our AVX2 kernel; "
    "w4a8: int4 weights on our kernel, AVX-512 or AVX2, inputs rounded to int8 per 32; "
    "w4a8-avx512: on the AVX-512 one only); "
    "td-only, split or masked (the TD's own weights), engine "
    "tdllm; the `quant` setting, TDLLM_QUANT",
)
@click.option(
    "--compile",
    "compile_mode",
    type=click.Choice(COMPILE_MODES),
    default=None,
    help="decode: the decode step compiled at load (two graphs: one row, more; engine tdllm, "
    "td-only or split; needs g++); decode-groups: one graph every group of blocks shares "
    "(~1 minute; quantized or fp32 weights); the `compile` setting, TDLLM_COMPILE",
)
@click.option("--check", is_flag=True, help="resolve and print the settings, then exit")
def serve(
    config_file: Path | None,
    host: str | None,
    port: int | None,
    model: str | None,
    quant: str | None,
    compile_mode: str | None,
    check: bool,
) -> None:
    """Serve the OpenAI-compatible API (gunicorn, one worker) until stopped.

    Settings: defaults, then the TOML file (--config or TDLLM_CONFIG), then TDLLM_* variables,
    then these options. See docs/api.md.
    """
    from tdllm.settings import load_settings, service_environment

    given = {"host": host, "port": port, "model": model, "quant": quant, "compile": compile_mode}
    changes = {k: str(v) for k, v in given.items() if v is not None}
    env = service_environment(config_file, **changes)
    settings = load_settings(environ=env)  # fail here, with one line, not inside gunicorn
    if check:
        shown = {k: v for k, v in vars(settings).items() if k != "api_keys"}
        shown["api_keys"] = f"{len(settings.api_keys)} configured"
        click.echo(json.dumps(shown, indent=2))
        return
    argv = gunicorn_argv()
    os.execve(argv[0], argv, env)  # noqa: S606  # fixed argv; gunicorn becomes this process: systemd signals reach it
