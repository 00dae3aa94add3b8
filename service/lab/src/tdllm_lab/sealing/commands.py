"""`tdllm seal` and `tdllm keygen`: the owner-side tools that make sealed models.

Heavy imports (torch, the model code) happen inside the commands so `tdllm --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from tdllm.errors import TdllmError, UsageError


@click.command()
@click.argument("source")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="new (or empty) directory for the sealed model",
)
@click.option(
    "--recipient",
    "recipients",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    multiple=True,
    help="public key (JWK or PEM, X25519 or P-384) to wrap the data key to; repeatable",
)
@click.option(
    "--seal-pattern",
    "seal_patterns",
    multiple=True,
    help="glob over tensor names that must be encrypted (wins over --public-pattern)",
)
@click.option(
    "--public-pattern",
    "public_patterns",
    multiple=True,
    help="glob over tensor names stored in the clear (still hash-bound); default: none",
)
@click.option("--key-id", default=None, help="key label for the broker [default: model/<id>]")
@click.option(
    "--model-name",
    default=None,
    help="the owner's model name in the authenticated manifest; the broker's key record must "
    "name the same [default: the source's name]",
)
@click.option(
    "--model-version",
    type=click.IntRange(1, 2**53 - 1),
    default=1,
    show_default=True,
    help="monotonic version of this model: seal every new version with a higher number, so "
    "the broker policy and the image can refuse the older ones",
)
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "fp32"]),
    default=None,
    help="store tensors as this type [default: the source's]",
)
@click.option(
    "--keep-quantized",
    is_flag=True,
    help="a GGUF source's quantized weights stay quantized: sealed as their GGUF blocks "
    "(Q4_0, Q4_1, Q8_0, Q4_K, ...; sealed format version 2), not as floats",
)
def seal(
    source: str,
    out: Path,
    recipients: tuple[Path, ...],
    seal_patterns: tuple[str, ...],
    public_patterns: tuple[str, ...],
    key_id: str | None,
    model_name: str | None,
    model_version: int,
    dtype: str | None,
    keep_quantized: bool,
) -> None:
    """Encrypt SOURCE ('bundled', a .gguf file or a model directory) into a sealed directory.

    Every tensor is encrypted with a fresh AES-256 data key unless it matches --public-pattern;
    the data key is wrapped to each --recipient as a JWE. Layout: docs/sealed-format.md.
    """
    from tdllm.model.loader import parse_dtype
    from tdllm.sealing.recipients import load_public_key
    from tdllm.sources import open_checkpoint
    from tdllm_lab.sealing.writer import seal_checkpoint

    if not recipients:
        raise UsageError(
            "no --recipient: a sealed model nobody can open is a mistake "
            "(make a key pair with `tdllm keygen --out PREFIX`)"
        )
    keys = [load_public_key(p) for p in recipients]
    checkpoint = open_checkpoint(source)
    try:
        report = seal_checkpoint(
            checkpoint,
            out,
            keys,
            key_id=key_id,
            model_name=model_name,
            model_version=model_version,
            dtype=parse_dtype(dtype) if dtype else None,
            seal_patterns=seal_patterns,
            public_patterns=public_patterns,
            keep_quantized=keep_quantized,
        )
    except OSError as exc:  # disk full, permissions: the partial output is already removed
        raise TdllmError(f"cannot write {out}: {exc.strerror or exc}") from None
    click.echo(
        f"sealed {checkpoint.name} -> {out}: model {report.model!r} version {report.version}, "
        f"model id {report.model_id}, key id {report.key_id}, "
        f"{report.sealed_tensors} sealed + {report.public_tensors} public tensors"
        f"{f' ({report.quantized_tensors} as GGUF blocks)' if keep_quantized else ''}, "
        f"{report.stored_bytes / 1e6:.1f} MB, {report.recipients} recipient(s)"
    )


@click.command()
@click.option(
    "--out",
    "prefix",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="writes PREFIX.pub and PREFIX.key (mode 0600)",
)
@click.option(
    "--curve", type=click.Choice(["X25519", "P-384"]), default="X25519", show_default=True
)
def keygen(prefix: Path, curve: str) -> None:
    """Create a recipient key pair for `tdllm seal --recipient` / `tdllm generate --key`."""
    from tdllm.sealing.recipients import write_key_pair

    pub, key = write_key_pair(prefix, curve)
    click.echo(f"wrote {pub} (public, give to the sealer) and {key} (private, mode 0600)")
