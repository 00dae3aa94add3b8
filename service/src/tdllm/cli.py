"""The `tdllm` command line: generate, serve, chat, doctor; the lab's commands when installed.

Every error a user can cause ends as one line on stderr (`error: ...`) and a non-zero exit code;
no traceback reaches the terminal.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path
from typing import Any

import click

from tdllm.api.commands import serve
from tdllm.cluster_commands import cluster
from tdllm.errors import TdllmError, UsageError
from tdllm.model.compile_modes import COMPILE_MODES
from tdllm.model.quant_formats import QUANTS
from tdllm.profiles.registry import PROFILE_NAMES
from tdllm.trusted.crossing import DEVICE_KINDS
from tdllm_attest.client.chat_cli import chat
from tdllm_attest.errors import AttestationError

DTYPE = click.Choice(["bf16", "fp32"])
QUANT = click.Choice(QUANTS)


# The lab's commands (tdllm-lab: benches, attacks, protection tools, sealing, the dev appliance)
# are not in the TD image; with the lab installed they come from its `tdllm.commands` entry
# point, without it these names say how to get them.
LAB_COMMANDS = (
    "appliance",
    "attack",
    "bench",
    "finetune-tail",
    "keygen",
    "prepare",
    "protect",
    "seal",
)
ENTRY_POINTS = "tdllm.commands"


class _WithLab(click.Group):
    """The core commands, plus the lab's when tdllm-lab is installed."""

    def _lab(self) -> tuple[dict[str, click.Command], str | None]:
        """The lab's commands by name, and why loading them failed (None: it did not)."""
        found: dict[str, click.Command] = {}
        for entry in importlib.metadata.entry_points(group=ENTRY_POINTS):
            try:
                commands = entry.load()
            except ImportError as exc:  # installed metadata, code gone: say so, keep the core
                return found, f"tdllm-lab is installed but cannot be loaded ({exc})"
            found.update({c.name: c for c in commands if c.name is not None})
        return found, None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lab()[0]})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        lab, broken = self._lab()
        command = lab.get(cmd_name)
        if command is None and cmd_name in LAB_COMMANDS:
            raise UsageError(
                broken
                or f"`tdllm {cmd_name}` is a lab tool, not part of the TD image: install "
                "tdllm-lab (`pip install ./service/lab` in a checkout, or `make venv`)"
            )
        return command


@click.group(cls=_WithLab, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tdllm")
def cli() -> None:
    """tdllm: a confidential LLM appliance for Intel TDX."""


@cli.command()
@click.argument("prompt")
@click.option(
    "--model",
    default="bundled",
    show_default=True,
    help="'bundled', a .gguf file, a model directory or a sealed model directory",
)
@click.option(
    "--key",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="recipient private key that opens a sealed --model (from `tdllm keygen`)",
)
@click.option(
    "--chat/--no-chat", default=False, help="wrap the prompt in the model's chat template"
)
@click.option("--system", default=None, help="system message (with --chat)")
@click.option("--max-tokens", type=click.IntRange(1, 32768), default=256, show_default=True)
@click.option(
    "--temperature",
    type=click.FloatRange(0.0, 2.0),
    default=0.2,
    show_default=True,
    help="0 is greedy",
)
@click.option(
    "--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.9, show_default=True
)
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 is off")
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="stop string (repeatable)")
@click.option("--dtype", type=DTYPE, default="fp32", show_default=True)
@click.option(
    "--quant",
    type=QUANT,
    default="none",
    show_default=True,
    help="td-only, split's private tail, masked's TD-held delta and head: keep the weights "
    "int8/int4 (quantized at load; "
    "activations stay --dtype); "
    "w8a8: int8 weights, activations rounded to int8 per row (fastest on VNNI CPUs); "
    "w8a8-onednn: w8a8 on oneDNN's int8 GEMM (faster prefill and batches on AMX CPUs); "
    "w8a8-avx512: w8a8 on our AVX-512 VNNI kernel (faster decode; built at first use, needs "
    "a C++ compiler); w8a8-avx2: int8 weights and inputs, a scale per 32, on our AVX2 kernel "
    "(likewise); w4a8: int4 weights, inputs rounded to int8 per 32, on our kernel "
    "(AVX-512 VNNI, else AVX2; likewise); w4a8-avx512: on the AVX-512 one only",
)
@click.option(
    "--compile",
    "compile_mode",
    type=click.Choice(COMPILE_MODES),
    default="off",
    show_default=True,
    help="decode: compile the decode step (two graphs: one row, more) before generating "
    "(minutes on 2 cores, needs g++; td-only and split); decode-groups: one graph every group "
    "of blocks shares (~1 minute; quantized or fp32 weights)",
)
@click.option(
    "--profile",
    type=click.Choice(PROFILE_NAMES),
    default="td-only",
    show_default=True,
    help="split: the public prefix runs on --device, the private tail in the TD; masked: every "
    "block's public-base GEMM runs one-time-padded on --device; obfuscated: every projection "
    "runs on --device with decoy rows and RoPE pairs, restored in the TD (seed 000; broken, see "
    "docs/security.md)",
)
@click.option("--device", type=click.Choice(DEVICE_KINDS), default="cpu", show_default=True)
@click.option(
    "--k", type=click.IntRange(1), default=2, show_default=True, help="split: tail layers in the TD"
)
@click.option(
    "--public-ref",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="split: public-prefix reference from `tdllm prepare` (default: the bundled base)",
)
def generate(
    prompt: str,
    model: str,
    key: Path | None,
    chat: bool,
    system: str | None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: tuple[str, ...],
    dtype: str,
    quant: str,
    compile_mode: str,
    profile: str,
    device: str,
    k: int,
    public_ref: Path | None,
) -> None:
    """Generate a completion for PROMPT ('-' reads stdin) and stream it to the terminal."""
    from tdllm.engine import Engine, SamplingParams
    from tdllm.engine.prompt_check import check_prompt
    from tdllm.model.loader import parse_dtype
    from tdllm.profiles import ProtectionOptions, build_model
    from tdllm.sources import open_checkpoint

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    try:
        params = SamplingParams(max_tokens, temperature, top_k, top_p, seed, stop)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    checkpoint = open_checkpoint(model, key)
    tokenizer = checkpoint.tokenizer
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        prompt = tokenizer.apply_chat_template(messages)
    ids = tokenizer.encode(prompt)
    context = checkpoint.config.max_position_embeddings
    check_prompt(ids, vocab_size=checkpoint.config.vocab_size, context=context)
    status(f"loading {checkpoint.name} ({dtype}, quant {quant}, {profile}) ...")
    max_seq_len = min(context, len(ids) + max_tokens + 1)
    options = ProtectionOptions(profile, device, k, public_ref, quant=quant)
    served = build_model(checkpoint, parse_dtype(dtype), options, 1, max_seq_len)
    try:
        engine = Engine(
            served.model,
            tokenizer,
            max_batch=1,
            max_seq_len=max_seq_len,
            compile=compile_mode,
            status=status,
        )
        for out in engine.stream(ids, params):
            click.echo(out.text, nl=False)
        click.echo()
    finally:
        served.close()


cli.add_command(serve)
cli.add_command(chat)
cli.add_command(cluster)


@cli.command()
def doctor() -> None:
    """Report CPU features, torch/oneDNN versions, IPEX, and whether this is a TDX guest."""
    from tdllm.doctor import report

    rows = report()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


def status(message: str) -> None:
    """Progress for people: on stderr, and only when stderr is a terminal."""
    if sys.stderr.isatty():
        click.echo(message, err=True)


def main(argv: list[str] | None = None) -> Any:
    """Entry point: run the CLI, turning every expected failure into one line and an exit code."""
    try:
        return cli.main(args=argv, prog_name="tdllm", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except (TdllmError, AttestationError) as exc:  # AttestationError: the client SDK's too
        click.echo(f"error: {exc.diagnostics()}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
