"""Reference values of an image build: write and sign them, verify them, turn them into a policy.

    refvalues.py sign    --artefacts DIR --profile P [--engine tdllm|vllm] --verity-root-hash H
                         --verity-salt S --source-date-epoch N --repo DIR --key KEY.pem
                         [--create-dev-key] --out F
    refvalues.py verify  F --key-pub KEY.pub [--artefacts DIR]
    refvalues.py policy  F --key-pub KEY.pub --golden GOLDEN.json --key KEY.pem --out POLICY.json

`sign` writes the build's digests (SHA-384 of the UKI, kernel, initrd, root image, command line
and package manifests, plus the verity root hash, git commit and SOURCE_DATE_EPOCH) and the
serving engine the image carries (`tdllm`, or `vllm` with vLLM's venv in the root) in the
signed envelope of `tdllm_attest.policy_format`: {"policy": DOC, "signature": {"alg": "Ed25519",
"value": BASE64}} over `canonical_json(DOC)`. The document's schema is
`tdllm-image-reference-values/1`, so `load_policy` verifies its signature and then refuses it as a
policy: it describes artefacts, not registers. MRTD/RTMR0-2 come from a golden boot on TDX
hardware per deployment shape; `policy` checks that the golden boot ran this build's UKI and signs
a `tdllm-attest-policy/1` with `sign_policy`, which is what the key broker loads.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from tdllm_attest.ed25519_pem import private_key_from_pem
from tdllm_attest.errors import PolicyDocumentError
from tdllm_attest.policy_format import POLICY_SCHEMA, SIGNATURE_ALG, load_public_key, sign_policy
from tdllm_attest.wire import canonical_json

SCHEMA = "tdllm-image-reference-values/1"
ARTEFACTS = ("uki.efi", "vmlinuz", "initrd.img", "root.img")
MANIFESTS = ("packages.txt", "python-packages.txt")
ENGINES = ("tdllm", "vllm")
# manifests only some engines' images have: the vLLM venv's `pip list`
ENGINE_MANIFESTS = {"tdllm": (), "vllm": ("vllm-packages.txt",)}
GOLDEN_KEYS = {"shape", "uki_sha384", "mr_td", "rtmr0", "rtmr1", "rtmr2", "xfam"}


class RefValuesError(Exception):
    """A user-facing failure: printed as one `error:` line."""


def sha384_file(path: Path) -> str:
    digest = hashlib.sha384()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def git_state(repo: Path) -> tuple[str, bool]:
    """(commit, dirty) of the source tree; 'unknown' outside a git checkout."""
    git = ["git", "-c", f"safe.directory={repo}", "-C", str(repo)]
    try:
        commit = subprocess.run(  # noqa: S603 - fixed git argv
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(  # noqa: S603 - fixed git argv
            [*git, "status", "--porcelain"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return commit, bool(status.strip())


def build_document(
    artefacts: Path,
    *,
    profile: str,
    verity_root_hash: str,
    verity_salt: str,
    source_date_epoch: int,
    commit: str,
    dirty: bool,
    engine: str = "tdllm",
) -> dict[str, Any]:
    """The reference-values document for the artefacts in `artefacts` (not yet signed)."""
    if engine not in ENGINES:
        raise RefValuesError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    manifests = (*MANIFESTS, *ENGINE_MANIFESTS[engine])
    missing = [n for n in (*ARTEFACTS, *manifests, "cmdline.txt") if not (artefacts / n).is_file()]
    if missing:
        raise RefValuesError(f"{artefacts}: missing artefact(s) {', '.join(missing)}")
    cmdline = (artefacts / "cmdline.txt").read_text(encoding="utf-8")
    if verity_root_hash not in cmdline:
        raise RefValuesError("the command line does not carry the verity root hash")
    return {
        "schema": SCHEMA,
        "profile": profile,
        # signed with the rest: which serving engine (and so which venvs) the root holds
        "engine": engine,
        "hash_alg": "sha384",
        "artefacts": {
            name: {"sha384": sha384_file(path), "size": path.stat().st_size}
            for name in ARTEFACTS
            for path in (artefacts / name,)
        },
        "cmdline": cmdline,
        "cmdline_sha384": hashlib.sha384(cmdline.encode()).hexdigest(),
        "verity": {"root_hash": verity_root_hash, "salt": verity_salt, "hash_alg": "sha256"},
        "manifests": {name: sha384_file(artefacts / name) for name in manifests},
        "source_date_epoch": source_date_epoch,
        "git_commit": commit,
        "git_dirty": dirty,
    }


def sign_document(document: dict[str, Any], key: Ed25519PrivateKey) -> str:
    """The envelope of `tdllm_attest.policy_format` around `document` (JSON text)."""
    signature = key.sign(canonical_json(document))
    envelope = {
        "policy": document,
        "signature": {"alg": SIGNATURE_ALG, "value": base64.b64encode(signature).decode()},
    }
    return json.dumps(envelope, indent=2, sort_keys=True) + "\n"


def verify_document(text: str, key: Ed25519PublicKey) -> dict[str, Any]:
    """Check the envelope's Ed25519 signature as `load_policy` does; return the document."""
    try:
        envelope = json.loads(text)
        signature = envelope["signature"]
        document = envelope["policy"]
        if set(envelope) != {"policy", "signature"} or signature["alg"] != SIGNATURE_ALG:
            raise ValueError
        key.verify(base64.b64decode(signature["value"], validate=True), canonical_json(document))
    except (ValueError, KeyError, TypeError, binascii.Error, InvalidSignature):
        raise RefValuesError("reference values: signature does not verify with the key") from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        raise RefValuesError(f"reference values: schema is not {SCHEMA!r}")
    if document.get("engine", "tdllm") not in ENGINES:  # absent: a build from before the option
        raise RefValuesError(f"reference values: unknown engine {document.get('engine')!r}")
    return document


def engine_of(document: dict[str, Any]) -> str:
    """The serving engine the image carries (documents from before the option: tdllm)."""
    return str(document.get("engine", "tdllm"))


def check_artefacts(document: dict[str, Any], artefacts: Path) -> list[str]:
    """Names of artefacts on disk whose SHA-384 differs from the signed values."""
    bad = []
    for name, entry in sorted(document["artefacts"].items()):
        path = artefacts / name
        if not path.is_file() or sha384_file(path) != entry["sha384"]:
            bad.append(name)
    return bad


def policy_from_golden(
    document: dict[str, Any], golden: dict[str, Any], name: str | None = None
) -> dict[str, Any]:
    """A `tdllm-attest-policy/1` document from a golden boot of this build's UKI."""
    if not isinstance(golden, dict) or set(golden) != GOLDEN_KEYS:
        raise RefValuesError(f"golden boot record: want exactly the keys {sorted(GOLDEN_KEYS)}")
    if golden["uki_sha384"] != document["artefacts"]["uki.efi"]["sha384"]:
        raise RefValuesError("golden boot record is of another UKI than these reference values")
    image = document["profile"]
    if engine_of(document) != "tdllm":
        image += f"+{engine_of(document)}"
    label = f"{image}@{document['git_commit'][:12]} on {golden['shape']}"
    return {
        "schema": POLICY_SCHEMA,
        "name": name or label,
        "tcb": {"accepted_statuses": ["UpToDate"], "allowed_advisories": []},
        "xfam": [golden["xfam"]],
        "measurements": [
            {
                "name": label,
                "mr_td": golden["mr_td"],
                "rtmr0": golden["rtmr0"],
                "rtmr1": golden["rtmr1"],
                "rtmr2": golden["rtmr2"],
            }
        ],
        "mr_config_id": "00" * 48,
        "mr_owner": "00" * 48,
        "mr_owner_config": "00" * 48,
        "rtmr3": "zero",
    }


def load_private_key(path: Path, *, create: bool) -> Ed25519PrivateKey:
    if not path.exists() and create:
        key = Ed25519PrivateKey.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        print(f"warning: created an UNSAFE development signing key {path}", file=sys.stderr)
    try:
        return private_key_from_pem(path.read_bytes(), f"signing key {path}")
    except (OSError, ValueError) as exc:
        raise RefValuesError(f"cannot load signing key {path}: {exc}") from None


def read_public_key(path: Path) -> Ed25519PublicKey:
    try:
        return load_public_key(path.read_bytes())
    except OSError as exc:
        raise RefValuesError(f"cannot read {path}: {exc.strerror}") from None
    except PolicyDocumentError as exc:
        raise RefValuesError(str(exc)) from None


def _cmd_sign(args: argparse.Namespace) -> None:
    key = load_private_key(args.key, create=args.create_dev_key)
    commit, dirty = git_state(args.repo)
    document = build_document(
        args.artefacts,
        profile=args.profile,
        verity_root_hash=args.verity_root_hash,
        verity_salt=args.verity_salt,
        source_date_epoch=args.source_date_epoch,
        commit=commit,
        dirty=dirty,
        engine=args.engine,
    )
    args.out.write_text(sign_document(document, key), encoding="utf-8")
    public = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    args.out.with_suffix(".pub").write_bytes(public)


def _cmd_verify(args: argparse.Namespace) -> None:
    document = verify_document(args.file.read_text(encoding="utf-8"), read_public_key(args.key_pub))
    if args.artefacts is not None:
        bad = check_artefacts(document, args.artefacts)
        if bad:
            raise RefValuesError(f"artefact digest mismatch: {', '.join(bad)}")
    engine = engine_of(document)
    print(f"ok: {document['profile']} image, engine {engine}, commit {document['git_commit']}")


def _cmd_policy(args: argparse.Namespace) -> None:
    document = verify_document(args.file.read_text(encoding="utf-8"), read_public_key(args.key_pub))
    try:
        golden = json.loads(args.golden.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RefValuesError(f"cannot read golden boot record {args.golden}: {exc}") from None
    policy = policy_from_golden(document, golden, args.name)
    key = load_private_key(args.key, create=False)
    try:
        signed = sign_policy(policy, key)  # schema-checks the registers' sizes too
    except PolicyDocumentError as exc:
        raise RefValuesError(f"golden boot record: {exc}") from None
    args.out.write_text(signed, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="refvalues.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sign", help="write and sign the build's reference values")
    s.add_argument("--artefacts", type=Path, required=True)
    s.add_argument("--profile", required=True, choices=("prod", "dev", "smoke"))
    s.add_argument("--engine", default="tdllm", choices=ENGINES)
    s.add_argument("--verity-root-hash", required=True)
    s.add_argument("--verity-salt", required=True)
    s.add_argument("--source-date-epoch", type=int, required=True)
    s.add_argument("--repo", type=Path, required=True)
    s.add_argument("--key", type=Path, required=True)
    s.add_argument("--create-dev-key", action="store_true")
    s.add_argument("--out", type=Path, required=True)
    v = sub.add_parser("verify", help="check the signature (and the artefacts on disk)")
    v.add_argument("file", type=Path)
    v.add_argument("--key-pub", type=Path, required=True)
    v.add_argument("--artefacts", type=Path)
    p = sub.add_parser("policy", help="sign an attestation policy from a golden boot record")
    p.add_argument("file", type=Path)
    p.add_argument("--key-pub", type=Path, required=True)
    p.add_argument("--golden", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--name")
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    handlers = {"sign": _cmd_sign, "verify": _cmd_verify, "policy": _cmd_policy}
    try:
        handlers[args.command](args)
    except RefValuesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
