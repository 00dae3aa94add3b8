"""`tdllm chat --e2e URL PROMPT`: one attested, end-to-end encrypted chat turn."""

from __future__ import annotations

from pathlib import Path

import click

from tdllm.errors import UsageError

_FILE = click.Path(path_type=Path, dir_okay=False, exists=True)
INSECURE_WARNING = (
    "WARNING: --insecure-any-td: the TD's identity (MRTD/RTMRs) was NOT checked; any TD on "
    "genuine hardware, including a host's own prompt-logging image, gets this prompt"
)


@click.command()
@click.argument("prompt")
@click.option("--e2e", "url", required=True, help="service base URL, e.g. http://127.0.0.1:8000")
@click.option(
    "--policy",
    "policy_file",
    type=_FILE,
    default=None,
    help="signed reference-values policy (tdllm-attest-policy/1) the TD must satisfy",
)
@click.option(
    "--policy-key",
    type=_FILE,
    default=None,
    help="Ed25519 public key (PEM) that signed --policy",
)
@click.option(
    "--insecure-any-td",
    is_flag=True,
    default=False,
    help="INSECURE: accept any TD on genuine hardware without checking its measurements",
)
@click.option(
    "--simulated-root",
    type=_FILE,
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
def chat(
    prompt: str,
    url: str,
    policy_file: Path | None,
    policy_key: Path | None,
    insecure_any_td: bool,
    simulated_root: Path | None,
    max_tokens: int,
    stream: bool,
) -> None:
    """Verify the service's attestation against --policy, then send PROMPT encrypted to its
    attested key.

    Every answer is signed by the attested signing key; a streamed answer only counts once its
    signed final record verified (before that, an error line ends the output).
    """
    from tdllm.api.attest_client import anchor_for, load_reference_policy
    from tdllm.api.e2e_client import E2eClient, RequestsTransport
    from tdllm.settings import ALLOW_SIMULATED_ENV, load_settings

    _check_policy_options(policy_file, policy_key, insecure_any_td)
    settings = load_settings()
    environ = {ALLOW_SIMULATED_ENV: "1"} if settings.allow_simulated else {}
    if simulated_root is not None and not settings.allow_simulated:
        raise UsageError(f"--simulated-root also needs {ALLOW_SIMULATED_ENV}=1")
    anchor = anchor_for(simulated_root.read_bytes() if simulated_root else None, environ)
    policy = None
    if policy_file is not None and policy_key is not None:
        policy = load_reference_policy(policy_file, policy_key)
    client = E2eClient(
        RequestsTransport(url.rstrip("/")), anchor, policy=policy, insecure_any_td=insecure_any_td
    )
    attested = client.attest()
    if attested.simulated:
        click.echo("WARNING: SIMULATED TDX attestation: this proves nothing", err=True)
    if attested.policy_name is None:
        click.echo(INSECURE_WARNING, err=True)
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        answer = client.chat(messages, max_tokens=max_tokens)
        click.echo(answer["choices"][0]["message"]["content"])
        return
    for chunk in client.chat_stream(messages, max_tokens=max_tokens):
        for choice in chunk.get("choices", []):
            click.echo(choice.get("delta", {}).get("content") or "", nl=False)
    click.echo()


def _check_policy_options(
    policy_file: Path | None, policy_key: Path | None, insecure_any_td: bool
) -> None:
    """Fail closed before any network: a TD must be checked against reference values, unless
    the caller says, loudly, that any TD will do."""
    if (policy_file is None) != (policy_key is None):
        raise UsageError("--policy and --policy-key must be given together")
    if policy_file is not None and insecure_any_td:
        raise UsageError("--insecure-any-td contradicts --policy: give one of them")
    if policy_file is None and not insecure_any_td:
        raise UsageError(
            "no reference values to check the TD against: give --policy FILE --policy-key "
            "PUB.pem (or --insecure-any-td to accept any TD)"
        )
