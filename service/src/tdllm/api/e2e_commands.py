"""`tdllm chat --e2e URL PROMPT`: one attested, end-to-end encrypted chat turn."""

from __future__ import annotations

from pathlib import Path

import click

from tdllm.errors import UsageError


@click.command()
@click.argument("prompt")
@click.option("--e2e", "url", required=True, help="service base URL, e.g. http://127.0.0.1:8000")
@click.option(
    "--simulated-root",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="UNSAFE: trust this simulated TDX root (also needs TDLLM_ALLOW_SIMULATED_TDX=1)",
)
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=128, show_default=True)
@click.option(
    "--stream/--no-stream",
    default=True,
    show_default=True,
    help="print the answer as its encrypted chunks arrive",
)
def chat(prompt: str, url: str, simulated_root: Path | None, max_tokens: int, stream: bool) -> None:
    """Verify the service's attestation, then send PROMPT encrypted to its attested key.

    Every answer is signed by the attested signing key; a streamed answer only counts once its
    signed final record verified (before that, an error line ends the output).
    """
    from tdllm.api.attest_client import anchor_for
    from tdllm.api.e2e_client import E2eClient, RequestsTransport
    from tdllm.settings import ALLOW_SIMULATED_ENV, load_settings

    settings = load_settings()
    environ = {ALLOW_SIMULATED_ENV: "1"} if settings.allow_simulated else {}
    if simulated_root is not None and not settings.allow_simulated:
        raise UsageError(f"--simulated-root also needs {ALLOW_SIMULATED_ENV}=1")
    anchor = anchor_for(simulated_root.read_bytes() if simulated_root else None, environ)
    client = E2eClient(RequestsTransport(url.rstrip("/")), anchor)
    attested = client.attest()
    if attested.simulated:
        click.echo("WARNING: SIMULATED TDX attestation: this proves nothing", err=True)
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        answer = client.chat(messages, max_tokens=max_tokens)
        click.echo(answer["choices"][0]["message"]["content"])
        return
    for chunk in client.chat_stream(messages, max_tokens=max_tokens):
        for choice in chunk.get("choices", []):
            click.echo(choice.get("delta", {}).get("content") or "", nl=False)
    click.echo()
