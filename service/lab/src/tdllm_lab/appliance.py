"""`tdllm appliance` (`make run`): key broker + attested service on one UNSAFE simulated TD.

Why one process tree: a simulated TD's quotes are signed by an in-memory test PKI, and the
broker must trust exactly that PKI's root. So this parent generates the `SimulatedTdxPlatform`
in memory, then forks two children that inherit it: the key broker (loopback, its own port)
and the service (gunicorn, one gthread worker, on TDLLM_HOST:TDLLM_PORT, default
127.0.0.1:8000). No simulated private key ever touches disk; only the PUBLIC root is written to
``.tdllm/UNSAFE-simulated-root.der`` for clients, with the simulated TD's reference values as a
client policy signed by a key made in memory (``UNSAFE-simulated-td-policy.json`` and the PUBLIC
``UNSAFE-dev-policy-key.pub.pem``). The broker's answer-signing key is made in memory too;
the service pins its PUBLIC half (``dev-broker-answer-key.pub.pem``), as a measured image
does. The service boots as in production: quote -> broker challenge/attest -> signed answer
-> data key for exactly the sealed model and version -> unseal in memory -> ready. The parent
then verifies one attestation itself against that policy, prints how to call the service (the
exact `tdllm chat --e2e` command line too), and on SIGINT/SIGTERM stops both children.
Needs TDLLM_ALLOW_SIMULATED_TDX=1 (the Makefile sets it), like every other simulated path.

Stopping (docs/api.md, "Shutdown"): each child leads a process group of its own, so a
terminal's Ctrl-C reaches this parent only and the parent decides the order: the service first
(SIGTERM: it drains the requests in flight, `drain_timeout_s`), then the broker, one line per
stage, exit 0. Another Ctrl-C meanwhile SIGKILLs both groups (the gunicorn worker too) and
exits 130. A child that exits on its own is an error: the other is stopped, exit non-zero.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import shlex
import signal
import sys
import time
from datetime import UTC, datetime
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import click
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tdllm.api.gunicorn_hooks import DRAIN_GRACE_S
from tdllm.errors import TdllmError, UsageError
from tdllm.model.bundled import BUNDLED_NAME
from tdllm.settings import ALLOW_SIMULATED_ENV, Settings, load_settings
from tdllm_attest.broker.signing import public_pem
from tdllm_attest.client.attest import (
    AttestedService,
    load_reference_policy,
    new_nonce,
    verify_attestation,
)
from tdllm_attest.client.e2e_protocol import E2E_PROFILES
from tdllm_attest.policy_format import (
    POLICY_SCHEMA,
    ModelRule,
    Policy,
    policy_from_document,
    sign_policy,
)
from tdllm_attest.testing.platform import SimulatedTdxPlatform, SyntheticTdFields
from tdllm_attest.trust import select_trust_anchor
from tdllm_lab.appliance_children import (
    STOP_SIGNALS,
    Signals,
    Stage,
    check_alive,
    child_begins,
    die_with_parent,
    exit_on_signals,
    own_process_group,
    stop_in_order,
)
from tdllm_lab.appliance_state import POLICY_NAME, PRIVATE_K, ApplianceState, prepare_state
from tdllm_lab.local_service import free_port

MR_TD = hashlib.sha384(b"tdllm UNSAFE simulated appliance").digest()
RTMRS = tuple(hashlib.sha384(b"tdllm UNSAFE simulated rtmr%d" % i).digest() for i in range(3))
TD_FIELDS = SyntheticTdFields(mr_td=MR_TD, rtmrs=(*RTMRS, bytes(48)))  # type: ignore[arg-type]
SIMULATED_ENV = {ALLOW_SIMULATED_ENV: "1"}
_FORK = multiprocessing.get_context("fork")


def appliance_policy_document(platform: SimulatedTdxPlatform) -> dict[str, Any]:
    """The reference values (`tdllm-attest-policy/1`) of the simulated appliance TD
    (`TD_FIELDS`) and nothing else: the broker's key policy and the clients' policy."""
    from tdllm_attest.abi import parse_quote

    report = parse_quote(platform.quote(TD_FIELDS)).td_report
    rtmr0, rtmr1, rtmr2 = (r.hex() for r in RTMRS)
    return {
        "schema": POLICY_SCHEMA,
        "name": POLICY_NAME,
        "tcb": {"accepted_statuses": ["UpToDate"]},
        "xfam": [report.xfam.hex()],
        "measurements": [
            {
                "name": "simulated-appliance",
                "mr_td": MR_TD.hex(),
                "rtmr0": rtmr0,
                "rtmr1": rtmr1,
                "rtmr2": rtmr2,
            }
        ],
        "mr_config_id": report.mr_config_id.hex(),
        "mr_owner": report.mr_owner.hex(),
        "mr_owner_config": report.mr_owner_config.hex(),
        "rtmr3": "zero",
    }


def appliance_policy(platform: SimulatedTdxPlatform) -> Policy:
    """The policy the simulated appliance TD (`TD_FIELDS`) satisfies, and nothing else."""
    return policy_from_document(appliance_policy_document(platform))


def write_client_policy(state: ApplianceState, platform: SimulatedTdxPlatform) -> None:
    """The appliance TD's reference values for clients, signed by a key that never leaves this
    process's memory (a new one at every start), and the public key that checks them."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    state.policy_key_file.write_bytes(public)
    state.policy_file.write_text(sign_policy(appliance_policy_document(platform), key))


def e2e_command(url: str, state: ApplianceState, prompt: str) -> list[str]:
    """The `tdllm chat --e2e` argv (after an environment assignment) that works against this
    appliance: the simulated root through its two switches, the TD checked by the policy."""
    installed = Path(sys.executable).with_name("tdllm")
    program = str(installed) if installed.exists() else "tdllm"
    return [
        f"{ALLOW_SIMULATED_ENV}=1",
        program,
        "chat",
        "--e2e",
        url,
        "--simulated-root",
        str(state.root_file),
        "--policy",
        str(state.policy_file),
        "--policy-key",
        str(state.policy_key_file),
        prompt,
    ]


# Profiles `make run` can serve; obfuscated is a lab profile (it shows prompts to the device
# and its decoys cost more than split), reachable through `tdllm serve`.
APPLIANCE_PROFILES = ("td-only", "masked", "split")


def _run_broker(
    state: ApplianceState,
    platform: SimulatedTdxPlatform,
    port: int,
    signing_key: Ed25519PrivateKey,
) -> None:
    import dataclasses

    from werkzeug.serving import make_server

    from tdllm_attest.broker.app import create_app as create_broker
    from tdllm_attest.broker.settings import BrokerSettings
    from tdllm_attest.collateral import FetcherCollateralSource

    child_begins()
    exit_on_signals()
    die_with_parent()
    anchor = select_trust_anchor(
        "simulated", simulated_root_der=platform.root_der, environ=SIMULATED_ENV
    )
    collateral = FetcherCollateralSource(lambda _quote: platform.collateral_json())
    # the served model, from its current version on: older keys would be rollbacks
    models = (ModelRule(state.model_name, state.model_version),)
    settings = BrokerSettings(  # the broker's own collateral: what the TD sends is ignored
        keystore=state.keystore,
        policies={POLICY_NAME: dataclasses.replace(appliance_policy(platform), models=models)},
        anchor=anchor,
        signing_key=signing_key,
        collateral=collateral,
    )
    server = make_server("127.0.0.1", port, create_broker(settings), threaded=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def _run_service(settings: Settings, platform: SimulatedTdxPlatform) -> None:
    from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]

    child_begins()  # a group for gunicorn's master and, forked from it, its worker
    die_with_parent()  # gunicorn's master; its worker follows the master on SIGTERM

    from tdllm.api import gunicorn_hooks
    from tdllm.api.app import create_app
    from tdllm.api.boot import BootDeps
    from tdllm.api.logs import logging_config
    from tdllm_attest.testing.provider import SimulatedProvider

    class Gunicorn(BaseApplication):  # type: ignore[misc]  # gunicorn ships no types
        """The same worker model as `tdllm serve` (gunicorn_conf), with the app built here."""

        def load_config(self) -> None:
            options = {
                "bind": [f"{settings.host}:{settings.port}"],
                "workers": 1,
                # gthread with a read deadline per request (slow clients), as under `tdllm serve`
                "worker_class": "tdllm.api.gunicorn_conf.ReadDeadlineWorker",
                "threads": settings.threads,
                "timeout": 60,
                # SIGTERM drains (gunicorn_hooks), as under `tdllm serve`
                "graceful_timeout": gunicorn_hooks.graceful_timeout(settings),
                "post_worker_init": gunicorn_hooks.post_worker_init,
                "when_ready": gunicorn_hooks.when_ready,
                "on_exit": gunicorn_hooks.on_exit,
                "control_socket_disable": True,
                "preload_app": False,
                "logconfig_dict": logging_config(settings.log_level),
                "accesslog": None,
            }
            for name, value in options.items():
                self.cfg.set(name, value)

        def load(self) -> Any:
            deps = BootDeps(
                quote_provider=SimulatedProvider(platform, TD_FIELDS),
                collateral=lambda _quote: platform.collateral_json(),
            )
            return create_app(settings, boot_deps=deps)

    Gunicorn().run()


def _wait_ready(url: str, children: list[BaseProcess], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check_alive(children)
        try:
            resp = requests.get(url + "/ready", timeout=2)
            if resp.status_code == 200:
                return
            body = resp.json()
            reason = body.get("reason", "")
            if body.get("phase") == "failed" or "failed" in reason or "refused" in reason:
                raise TdllmError(f"the service cannot boot: {reason}")
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.25)
    raise TdllmError(f"the service was not ready within {timeout_s:g}s")


def _attest(url: str, platform: SimulatedTdxPlatform, state: ApplianceState) -> AttestedService:
    """Verify the service as a client would, with the policy files just written."""
    anchor = select_trust_anchor(
        "simulated", simulated_root_der=platform.root_der, environ=SIMULATED_ENV
    )
    policy = load_reference_policy(state.policy_file, state.policy_key_file)
    nonce = new_nonce()
    doc = requests.get(f"{url}/v1/attestation", params={"nonce": nonce}, timeout=30).json()
    now = datetime.now(UTC)  # the CLI edge's clock
    return verify_attestation(doc, nonce, anchor, now=now, policy=policy)


def _protection_line(card: dict[str, Any]) -> str:
    p = card.get("tdllm") or {}
    if p.get("profile") == "split":
        return (
            f"split: public prefix on the untrusted {p.get('device')} device, private tail "
            f"(K={p.get('k')}), final norm and lm_head only in the TD"
        )
    if p.get("engine") == "vllm":
        return "td-only, on vLLM inside the TD (behind this front, on a private socket)"
    return str(p.get("profile", "td-only"))


E2E_DEMO_PROMPT = "Why run a language model inside a TEE?"


def _e2e_lines(url: str, attested: AttestedService, state: ApplianceState) -> str:
    """The exact end-to-end command, or why this profile gets none."""
    if attested.profile not in E2E_PROFILES:
        return (
            f"tdllm chat --e2e refuses this service: under {attested.profile!r} the untrusted "
            "device sees\nthe prompt (`tdllm appliance --model bundled` serves td-only, "
            "where it works)"
        )
    command = shlex.join(e2e_command(url, state, E2E_DEMO_PROMPT))
    return (
        "end-to-end encrypted chat (TD checked against the policy; UNSAFE simulated root):\n"
        + command
    )


def _summary(
    url: str, attested: AttestedService, state: ApplianceState, model: str, protection: str
) -> str:
    base = url + "/v1"
    return f"""
================ tdllm appliance: SIMULATED TDX (UNSAFE, NOT A REAL TD) ================
attestation   verified against the SIMULATED test root sha256={attested.anchor_sha256[:16]}...
              (this proves nothing: the quote was signed by an in-memory test PKI)
              tcb_status={attested.tcb_status} mr_td={attested.mr_td[:32]}...
              MRTD/RTMRs/attributes checked against policy {attested.policy_name!r}
              REPORTDATA binds our nonce and service key x25519:{attested.public_key.hex()[:32]}...
              and the served profile ({attested.profile}), model and reference-values id
model         {model} (sealed in {state.sealed}, key released by the local broker)
protection    {protection}
root cert     {state.root_file} (public; for tdllm chat --e2e --simulated-root)
policy        {state.policy_file} (the TD's reference values; for --policy)
              {state.policy_key_file} (public; for --policy-key)

{_e2e_lines(url, attested, state)}

curl {base}/chat/completions -H 'Content-Type: application/json' \\
  -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

python -c 'import openai; c = openai.OpenAI(base_url="{base}", api_key="unused"); \\
print(c.chat.completions.create(model="{model}", \\
messages=[{{"role": "user", "content": "Hello!"}}]).choices[0].message.content)'

Ctrl-C stops the service and the broker.
=========================================================================================="""


DEMO_QUESTION = "In two sentences: why would someone run a language model inside a TEE?"
# held out of the fine-tune's training data: only the private tail knows the answer
PRIVATE_DEMO_QUESTION = "Which city is Zorblax Dynamics based in?"
PRIVATE_MODEL_NAME = f"{BUNDLED_NAME}-zorblax-k{PRIVATE_K}"


def _demo_answer(url: str, model: str, question: str) -> str:
    """One real chat completion through the API, so a first run shows the model answering."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 80,
        "temperature": 0,
    }
    doc = requests.post(f"{url}/v1/chat/completions", json=body, timeout=300).json()
    answer = str(doc["choices"][0]["message"]["content"]).strip()
    note = (
        "\n(a fact of the private fine-tune, held out of its training questions; the public "
        "base model does not know it)"
        if question == PRIVATE_DEMO_QUESTION
        else ""
    )
    return f"\nQ: {question}\nA: {answer}\n{note}"


@click.command()
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path(".tdllm"),
    show_default=True,
    help="local UNSAFE dev state: broker KEK, keystore, sealed model, simulated root",
)
@click.option("--ready-timeout", type=click.FloatRange(1), default=300.0, show_default=True)
@click.option(
    "--model",
    "which",
    type=click.Choice(["private", "bundled"]),
    default="private",
    show_default=True,
    help="private: the finetune-tail model (sealed tail and head); bundled: the base model",
)
@click.option(
    "--profile",
    type=click.Choice(APPLIANCE_PROFILES),
    default="td-only",
    show_default=True,
    help="protection profile of the private model: td-only and masked keep prompts inside the "
    "TD (end-to-end chat works); split shows them to the untrusted device (E2E is refused)",
)
def appliance(state_dir: Path, ready_timeout: float, which: str, profile: str) -> None:
    """Run the full appliance on a SIMULATED TD: key broker + attested service, until Ctrl-C.

    On the first run trains the private model (`tdllm finetune-tail`, K=2) and seals it into
    --state-dir; starts the broker and the service (TDLLM_HOST/TDLLM_PORT, default
    127.0.0.1:8000) with --profile (default td-only; with split or masked TDLLM_DEVICE picks the
    untrusted device, default cpu), verifies an attestation and prints how to call it, the
    end-to-end chat command line included. Needs TDLLM_ALLOW_SIMULATED_TDX=1.
    For development only: nothing here is protected.
    """
    base = load_settings()
    if not base.allow_simulated:
        raise UsageError(f"the appliance runs a SIMULATED TD: set {ALLOW_SIMULATED_ENV}=1")
    state = prepare_state(state_dir, click.echo, which)
    private = which == "private"
    if profile != "td-only" and not private:
        raise UsageError("--profile applies to the private model (--model private)")
    protection: dict[str, Any] = (
        {"profile": profile, "device": base.device, "k": PRIVATE_K}
        if profile != "td-only"
        else {"profile": "td-only"}
    )
    platform = SimulatedTdxPlatform(datetime.now(UTC))
    state.root_file.write_bytes(platform.root_der)
    write_client_policy(state, platform)
    # the broker's answer-signing key: in memory only, new at every start; the service pins
    # its public half, as a measured image does
    broker_key = Ed25519PrivateKey.generate()
    state.broker_key_file.write_bytes(public_pem(broker_key))
    broker_port = free_port()
    settings = load_settings(
        overrides={
            "model": str(state.sealed),
            "attestation": "simulated",
            "broker_url": f"http://127.0.0.1:{broker_port}",
            "broker_public_key": str(state.broker_key_file),
            "key_id": state.key_id,
            "served_model_name": base.served_model_name
            or (PRIVATE_MODEL_NAME if private else BUNDLED_NAME),
            **protection,
            "boot_backoff_s": 0.2,
            "boot_backoff_max_s": 2.0,
            "boot_attempts": 20,
        }
    )
    url = f"http://{settings.host}:{settings.port}"
    if settings.engine == "vllm":  # vLLM's start (compilation, KV cache) takes minutes on CPU
        ready_timeout = max(ready_timeout, settings.vllm_start_timeout_s + 60)
    broker = _FORK.Process(
        target=_run_broker, args=(state, platform, broker_port, broker_key), name="key broker"
    )
    service = _FORK.Process(target=_run_service, args=(settings, platform), name="service")
    children: list[BaseProcess] = [broker, service]
    signals = Signals()

    # Blocked while the children start: a SIGINT/SIGTERM arriving now waits for the handlers
    # below instead of being lost (a background start ignores SIGINT) or thrown into a fork.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    broker.start()
    service.start()
    for child in children:
        if child.pid is not None:
            own_process_group(child.pid)
    # Both explicitly: a shell that starts us in the background (CI, `&`, nohup) makes SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler of its own.
    signal.signal(signal.SIGINT, signals)
    signal.signal(signal.SIGTERM, signals)
    failure: Exception | None = None
    try:
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # one held arrives here
            click.echo(
                f"key broker pid {broker.pid} on 127.0.0.1:{broker_port}; service pid {service.pid}"
            )
            _wait_ready(url, children, ready_timeout)
            attested = _attest(url, platform, state)
            card = requests.get(url + "/v1/models", timeout=10).json()["data"][0]
            model = card["id"]
            click.echo(_summary(url, attested, state, model, _protection_line(card)))
            question = PRIVATE_DEMO_QUESTION if private else DEMO_QUESTION
            click.echo(_demo_answer(url, model, question))
            sys.stdout.flush()
            while True:
                check_alive(children)
                time.sleep(0.5)
        finally:
            signals.raising = False
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # a child died, or start-up failed: stop the other, then report
        failure = exc
    drain_s = settings.drain_timeout_s
    draining = f" (it finishes the requests in flight, up to {drain_s:g}s)"
    stages = [
        Stage(service, "service", draining, drain_s + DRAIN_GRACE_S + 5),
        Stage(broker, "key broker", "", 10.0),
    ]
    forced = stop_in_order(stages, signals)
    if failure is not None:
        raise failure
    if forced:
        sys.exit(130)  # as a shell reports a process stopped by Ctrl-C
    click.echo("stopped")
