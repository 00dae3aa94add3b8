"""`tdllm-chat --e2e URL PROMPT`: one attested, end-to-end encrypted chat turn, torch-free.

The service's `tdllm chat` is this same click command. Exit codes: 0 answered, 1 the encrypted
exchange failed (tampered or unsigned answer, service error; a streamed answer printed so far is
then incomplete), 2 usage (found before any network), 4 attestation refused (nothing was sent).
Every failure is one line `error: ...` on stderr, never a traceback.

The API key, when the service wants one, comes from the environment variable TDLLM_API_KEY and
never from the command line (other users of the machine can read command lines); it travels
only inside the sealed request.

`--save-receipt DIR` keeps what a third party needs to check the answer's receipt offline
(`tdllm-verify receipt`): the receipt, the request bytes, the answer and the receipt attestation.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from tdllm_attest.cli_options import (
    check_collateral_options,
    check_reference_options,
    own_collateral,
    own_collateral_options,
    reference_value_options,
)
from tdllm_attest.client.attest import anchor_for, load_reference_policy
from tdllm_attest.client.e2e import E2eClient, RequestsTransport
from tdllm_attest.client.errors import E2eError
from tdllm_attest.client.receipt_protocol import receipt_of
from tdllm_attest.errors import EXIT_INTERNAL, AttestationError
from tdllm_attest.gpu.rim import RimStore
from tdllm_attest.trust import ALLOW_SIMULATED_ENV

API_KEY_ENV = "TDLLM_API_KEY"
EXIT_INTERRUPTED = 130
_FILE = click.Path(path_type=Path, dir_okay=False, exists=True)
INSECURE_WARNING = (
    "WARNING: --insecure-any-td: the TD's identity (MRTD/RTMRs) was NOT checked; any TD on "
    "genuine hardware, including a host's own prompt-logging image, gets this prompt"
)
SIMULATED_WARNING = "WARNING: SIMULATED TDX attestation: this proves nothing"


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=f"The API key, if the service needs one, is read from {API_KEY_ENV} (never from "
    "the command line); it travels only inside the sealed request.",
)
@click.argument("prompt")
@click.option(
    "--e2e",
    "url",
    required=True,
    metavar="URL",
    help="service base URL, e.g. http://127.0.0.1:8000",
)
@reference_value_options
@own_collateral_options
@click.option(
    "--simulated-root",
    type=_FILE,
    default=None,
    help=f"UNSAFE: trust this simulated TDX root (also needs {ALLOW_SIMULATED_ENV}=1)",
)
@click.option(
    "--save-receipt",
    "receipt_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="keep the answer's receipt, request, answer and receipt attestation in this folder "
    "(check them with tdllm-verify receipt)",
)
@click.option(
    "--gpu-rims",
    "gpu_rims",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="a gpu-cc service: NVIDIA's reference integrity manifests (.swidtag) for its GPUs' "
    "driver and VBIOS, to check the GPU evidence it serves",
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
    pccs_url: str | None,
    cache_dir: Path | None,
    collateral_file: Path | None,
    simulated_root: Path | None,
    receipt_dir: Path | None,
    gpu_rims: Path | None,
    max_tokens: int,
    stream: bool,
) -> None:
    """Verify the service's attestation against --policy, then send PROMPT encrypted to its
    attested key.

    Every answer is signed by the attested signing key; a streamed answer only counts once its
    signed final record verified (before that, an error line ends the output).
    """
    check_reference_options(policy_file, policy_key, insecure_any_td)
    check_collateral_options(pccs_url, cache_dir, collateral_file)
    allowed = os.environ.get(ALLOW_SIMULATED_ENV) == "1"
    if simulated_root is not None and not allowed:
        raise click.UsageError(f"--simulated-root also needs {ALLOW_SIMULATED_ENV}=1")
    environ = {ALLOW_SIMULATED_ENV: "1"} if allowed else {}
    anchor = anchor_for(simulated_root.read_bytes() if simulated_root else None, environ)
    policy = None
    if policy_file is not None and policy_key is not None:
        policy = load_reference_policy(policy_file, policy_key)
    with own_collateral(pccs_url, cache_dir, collateral_file) as collateral_source:
        client = E2eClient(
            RequestsTransport(url.rstrip("/")),
            anchor,
            policy=policy,
            insecure_any_td=insecure_any_td,
            api_key=os.environ.get(API_KEY_ENV) or None,
            collateral_source=collateral_source,
            gpu_rims=_rim_store(gpu_rims),
        )
        attested = client.attest()
    if attested.simulated:
        click.echo(SIMULATED_WARNING, err=True)
    if attested.policy_name is None:
        click.echo(INSECURE_WARNING, err=True)
    messages = [{"role": "user", "content": prompt}]
    kept: dict[str, Any] | list[Any]
    if not stream:
        kept = client.chat(messages, max_tokens=max_tokens)
        click.echo(kept["choices"][0]["message"]["content"])
    else:
        kept = []
        for chunk in client.chat_stream(messages, max_tokens=max_tokens):
            kept.append(chunk)
            for choice in chunk.get("choices", []):
                click.echo(choice.get("delta", {}).get("content") or "", nl=False)
        click.echo()
    if receipt_dir is not None:
        _save_receipt(receipt_dir, client, kept)


def _rim_store(folder: Path | None) -> RimStore | None:
    if folder is None:
        return None
    try:
        return RimStore.from_directory(folder)
    except AttestationError as exc:
        raise click.UsageError(f"--gpu-rims: {exc}") from None


def _save_receipt(folder: Path, client: E2eClient, kept: dict[str, Any] | list[Any]) -> None:
    """receipt.json, request.json (the exact bytes digested), response.json (the body, or the
    stream's chunks) and attestation.json (GET /v1/attestation/receipts) in `folder`."""
    receipt = receipt_of(kept)
    if receipt is None:
        raise E2eError("the answer carries no receipt")
    files = {
        "receipt.json": json.dumps(receipt, indent=1).encode(),
        "request.json": client.last_request or b"",
        "response.json": json.dumps(kept, ensure_ascii=False).encode(),
        "attestation.json": json.dumps(client.receipt_attestation(), indent=1).encode(),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
    except OSError as exc:
        raise click.ClickException(f"cannot save the receipt in {folder}: {exc}") from None
    paths = {name: folder / name for name in files}
    click.echo(
        f"receipt saved; check it with: tdllm-verify receipt {paths['receipt.json']} "
        f"--attestation {paths['attestation.json']} --request {paths['request.json']} "
        f"--response {paths['response.json']} --policy ... --policy-key ...",
        err=True,
    )


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: every expected failure is one line and an exit code."""
    try:
        chat.main(args=argv, prog_name="tdllm-chat", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted", EXIT_INTERRUPTED)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except AttestationError as exc:
        _fail(exc.diagnostics(), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:  # last resort: users must never see a traceback
        _fail(f"internal error: {type(exc).__name__}: {exc}", EXIT_INTERNAL)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)
