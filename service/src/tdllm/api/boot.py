"""The boot sequence, on a background thread: attest -> data key -> unseal in memory -> ready.

For a sealed model: a quote provider (configfs-tsm on a TD; the simulated one only when the
settings say ``attestation = "simulated"`` AND TDLLM_ALLOW_SIMULATED_TDX=1, never as a fallback)
feeds `KeyClient`'s challenge/attest exchange with the key broker, whose answer must be signed
by the broker key pinned in the image (`broker_public_key`); the released data key opens the
sealed directory only if the broker released it for exactly the model and version the
authenticated manifest names, and not below `min_model_version`; its tensors are decrypted
straight into the model's memory. Nothing plaintext is ever written to disk. An unreachable
broker (or a 429/5xx answer, or a garbled one: not JSON, cut off, the wrong fields, a proxy's
error page, no answer within the timeout) is retried with doubling back-off up to
``boot_attempts``; a refusal, and an answer the pinned broker key did not sign, are final. Until
the engine runs, `/ready` answers 503 with `BootState.reason`. Dev sources (bundled, GGUF,
directory) skip attestation.

Once serving, an engine that stops for any reason but an integrity failure (the untrusted device
process died or stalled, a step raised) asks its supervisor for a fresh process
(`restart_worker`): under gunicorn the worker exits gracefully and the master forks a new one,
which boots from scratch (attests, takes the key again, starts a new device). An integrity
failure stays failed: a restart would trust the lying device again.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tdllm.api.evidence_sources import cluster_node
from tdllm.api.metrics import ServiceMetrics
from tdllm.api.runner import EngineRunner, StepObserver
from tdllm.settings import Settings

if TYPE_CHECKING:  # imported lazily at run time: a plain model needs neither
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from tdllm.sealing.format import ModelVersion
    from tdllm.vllm_engine.backend import VllmBackend
    from tdllm.vllm_engine.child import SealedHandoff
    from tdllm_attest.broker.client import ReleasedKey
    from tdllm_attest.cluster.identity import NodeIdentity

log = logging.getLogger("tdllm.api.boot")
_RETRY_STATUSES = {429, 500, 502, 503, 504}
BROKER_TIMEOUT_S = 30.0


class BootFailed(Exception):  # noqa: N818  # reads as the event
    """Boot cannot complete; the message is the not-ready reason (no secrets in it)."""


class GarbledAnswer(Exception):  # noqa: N818  # reads as the event
    """The broker's HTTP answer is not a JSON object (a cut-off body, a proxy's HTML page)."""


@dataclass
class BootDeps:
    """What tests (or `make run`) inject instead of the real TD, broker and clock."""

    quote_provider: Any = None  # a tdllm_attest QuoteProvider
    transport: Any = None  # a tdllm_attest.broker.client.Transport
    collateral: Callable[[bytes], str] | None = None
    sleep: Callable[[float], None] | None = None
    broker_timeout_s: float = BROKER_TIMEOUT_S  # per HTTP exchange with the broker
    # asks the supervisor for a fresh process after the engine stopped (not for an integrity
    # failure); called on the engine thread with the reason. Default: `restart_worker`.
    restart: Callable[[str], None] | None = None
    # profile gpu-cc: the GPUs' evidence for an SPDM nonce (default: gpu_evidence_for)
    gpu_evidence: Callable[[bytes], Any] | None = None
    # the clock that judges node certificates (default: the system clock)
    now: Callable[[], datetime] | None = None


class BrokerTransport:
    """The broker over HTTP(S), strict about what comes back: the HTTP status decides between a
    retry and a refusal whatever the body says (a proxy's error page has no problem+json), and
    a 200 whose body is not a JSON object is `GarbledAnswer` (retried), not an empty answer."""

    def __init__(self, base_url: str, timeout_s: float = BROKER_TIMEOUT_S) -> None:
        import requests

        self.base_url, self.timeout_s = base_url, timeout_s
        self.session = requests.Session()

    def post_json(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        resp = self.session.post(self.base_url + path, json=body, timeout=self.timeout_s)
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if resp.status_code != 200:
            problem = doc if isinstance(doc, dict) else {}
            return resp.status_code, problem | {"status": resp.status_code}
        if not isinstance(doc, dict):  # sizes only: the body is the host's to choose
            what = "not JSON" if doc is None else "JSON but not an object"
            raise GarbledAnswer(f"HTTP 200, {len(resp.content)} bytes, {what}")
        return 200, doc

    def close(self) -> None:
        self.session.close()


def restart_worker(reason: str) -> None:
    """Ask gunicorn for a fresh worker: a graceful exit (streams still get their error event;
    the master forks a new worker, which boots from scratch). Outside gunicorn (tests, a dev
    server) there is no supervisor to ask: the service stays failed, and says so on /ready."""
    if not os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/"):
        log.error("engine stopped (%s); no supervisor: staying failed", reason)
        return
    log.error("engine stopped (%s); restarting the worker for a fresh boot", reason)
    os.kill(os.getpid(), signal.SIGTERM)  # the gunicorn worker's own graceful-exit signal


@dataclass
class BootState:
    """Where boot is; read by /ready and the API, written by the boot thread."""

    metrics: ServiceMetrics
    phase: str = "starting"
    reason: str = "starting"
    runner: EngineRunner | VllmBackend | None = None
    quote_provider: Any = None
    simulated: bool = False
    # collateral served with /v1/attestation quotes (collateral_for); None: clients fetch theirs
    collateral: Callable[[bytes], str] | None = None
    # the sealed model's identity as unsealed (Checkpoint.identity); /v1/attestation binds it.
    # None for a plain model.
    sealed_model: dict[str, str] | None = None
    # profile gpu-cc: nonce -> evidence of the GPUs, for the broker and for /v1/attestation
    gpu_evidence: Callable[[bytes], Any] | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.set("starting", "starting")

    def set(self, phase: str, reason: str) -> None:
        self.phase, self.reason = phase, reason
        self.metrics.boot_phase.state(phase)
        self.metrics.ready.set(1 if phase == "ready" else 0)

    @property
    def ready(self) -> bool:
        runner = self.runner
        if self.phase == "ready" and runner is not None and not _serving(runner):
            self.set("failed", runner.failed or "the engine stopped")  # e.g. a lying device
        return self.phase == "ready" and runner is not None and _serving(runner)

    def stop_booting(self) -> None:
        """The service is stopping: a boot still retrying the key broker gives up at its next
        wait (it would otherwise go on attesting, `boot_attempts` times, for a service gone)."""
        self._stopped.set()

    @property
    def stopping(self) -> bool:
        return self._stopped.is_set()

    def pause(self, seconds: float) -> None:
        """Boot's back-off between attempts, cut short when the service stops."""
        self._stopped.wait(seconds)

    def not_ready_reason(self) -> str:
        if self.phase == "ready" and self.runner is not None and not _serving(self.runner):
            return self.runner.failed or "the engine stopped"
        return self.reason


def _serving(runner: EngineRunner | VllmBackend) -> bool:
    # `failed` is set before the engine thread ends: not ready from the moment requests fail
    return runner.alive and runner.failed is None


def supervised(observer: StepObserver, restart: Callable[[str], None]) -> StepObserver:
    """`observer`, whose failure hook also calls `restart` unless a device failed an integrity
    check (then serving stops for good: a restart would trust the lying device again).

    A dead or stalled device (or any failed step) leaves no half-state to resume: the KV caches
    of every running sequence went with it, so the whole worker starts over.
    """
    record = observer.on_failure

    def on_failure(reason: str, integrity: bool) -> None:
        record(reason, integrity)
        if not integrity:
            restart(reason)

    observer.on_failure = on_failure
    return observer


def _printable(value: object, limit: int = 120) -> str:
    """`value` as text fit for /ready and the log: the broker's (or the host's) words, bounded."""
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Boot:
    def __init__(
        self,
        settings: Settings,
        state: BootState,
        deps: BootDeps | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.deps = deps or BootDeps()
        self.on_ready = on_ready  # work the first request should not wait for
        # engine 'vllm', sealed model: the key for vLLM's loader, from unsealing to hand-over
        self._handoff: SealedHandoff | None = None
        self.thread = threading.Thread(target=self.run, name="tdllm-boot", daemon=True)

    def start(self) -> Boot:
        self.thread.start()
        return self

    def run(self) -> None:
        try:
            checkpoint = self._open()
            self.state.set("loading", "loading the model into memory")
            if self.settings.engine == "vllm":
                self.state.runner = self._start_vllm(checkpoint)
            else:
                self.state.runner = self._start_engine(checkpoint)
            if self.on_ready is not None:
                self.on_ready()
            self.state.set("ready", "ready")
            log.info("ready: serving %s", self.state.runner.model_name)
        except BootFailed as exc:
            self.state.set("failed", str(exc))
            log.error("boot failed: %s", exc)
        except Exception as exc:  # a bug or a broken model: say which kind, never the content
            self.state.set("failed", f"boot failed ({type(exc).__name__})")
            log.error("boot failed: %s", type(exc).__name__)
        finally:
            if self._handoff is not None:  # never handed over: wipe it here
                from tdllm.sealing.keys import wipe

                wipe(self._handoff.key)
                self._handoff = None

    def _open(self) -> Any:
        from tdllm.errors import TdllmError
        from tdllm.sources import open_checkpoint

        if not self.settings.sealed:
            self.state.set("loading", f"opening model {self.settings.model}")
            try:
                return open_checkpoint(self.settings.model)
            except TdllmError as exc:
                raise BootFailed(exc.diagnostics()) from None
        from tdllm.sealing.errors import SealedModelMismatch
        from tdllm.sealing.keys import wipe
        from tdllm.sealing.reader import open_sealed

        release = self._fetch_key()
        self.state.set("unsealing", "opening the sealed model")
        path = Path(self.settings.model)
        try:
            expect = self._expected_model(release)
            checkpoint = open_sealed(
                path, data_key=release.key, model_id=self.settings.model_id, expect=expect
            )
            if self.settings.engine == "vllm":  # vLLM's loader opens it again with this key
                from tdllm.vllm_engine.child import SealedHandoff

                identity = checkpoint.identity or {}
                key = bytearray(release.key)
                self._handoff = SealedHandoff(key, identity, expect.model, expect.version)
        except SealedModelMismatch as exc:  # a rollback or a swapped model: fail closed
            raise BootFailed(f"refusing the released key: {exc.diagnostics()}") from None
        except TdllmError as exc:
            raise BootFailed(f"cannot open the sealed model: {exc.diagnostics()}") from None
        finally:
            wipe(release.key)
        # the identity of the manifest the MAC check authenticated, not of the disk now (the
        # host may change the file at any moment)
        self.state.sealed_model = checkpoint.identity
        return checkpoint

    def _expected_model(self, release: ReleasedKey) -> ModelVersion:
        """The model and version the key is for, unless this image refuses that version."""
        from tdllm.sealing.format import ModelVersion

        minimum = self.settings.min_model_version
        if release.version < minimum:
            raise BootFailed(
                f"refusing the released key: it is for model {release.model!r} version "
                f"{release.version}, below this image's min_model_version {minimum} (a rollback)"
            )
        try:
            return ModelVersion(release.model, release.version)
        except ValueError:
            raise BootFailed(
                "refusing the released key: its model name or version is invalid"
            ) from None

    def _write_cluster_credentials(self, node: NodeIdentity, release: ReleasedKey) -> None:
        """The node certificate and keys where the Ray node and the overlay read them."""
        directory = Path(self.settings.cluster_dir)
        try:
            node.write(directory, release.cluster)
        except OSError as exc:
            raise BootFailed(f"cannot write the node certificate to {directory}: {exc}") from None
        log.info("cluster node %s certified; credentials in %s", node.address, directory)

    def _broker_key(self) -> Ed25519PublicKey:
        """The broker's Ed25519 public key pinned in the image (`broker_public_key`)."""
        from tdllm_attest.broker.signing import load_broker_public_key

        path = Path(self.settings.broker_public_key or "")
        try:
            return load_broker_public_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise BootFailed(f"cannot load the pinned broker public key {path}: {exc}") from None

    def _fetch_key(self) -> ReleasedKey:
        """The data key and the model/version the (authenticated) broker released it for, over
        the given transport or a `BrokerTransport` of our own, closed after (its pooled
        connection would otherwise stay open until the garbage collector finds it)."""
        if self.deps.transport is not None:
            return self._fetch_key_over(self.deps.transport)
        transport = BrokerTransport(self.settings.broker_url or "", self.deps.broker_timeout_s)
        try:
            return self._fetch_key_over(transport)
        finally:
            transport.close()

    def _fetch_key_over(self, transport: Any) -> ReleasedKey:
        import requests

        from tdllm_attest.broker.client import (
            BrokerAuthenticationError,
            KeyClient,
            KeyReleaseError,
        )
        from tdllm_attest.errors import AttestationError, GpuEvidenceError

        key_id = self.settings.key_id or ""
        provider = self.state.quote_provider
        timeout = self.deps.broker_timeout_s
        # no collateral in the request: the broker verifies against collateral it fetched itself
        client = KeyClient(
            transport=transport,
            provider=provider,
            broker_key=self._broker_key(),
            gpu_evidence=self.state.gpu_evidence,
            now=self.deps.now or (lambda: datetime.now(UTC)),
        )
        node = cluster_node(self.settings)
        sleep = self.deps.sleep or self.state.pause
        attempts, delay = self.settings.boot_attempts, self.settings.boot_backoff_s
        metric = self.state.metrics.key_release_attempts
        for attempt in range(1, attempts + 1):
            if self.state.stopping:
                raise BootFailed("the service stopped while attesting to the key broker")
            self.state.set(
                "attesting", f"attesting to the key broker (attempt {attempt}/{attempts})"
            )
            try:
                release = client.fetch_release(key_id, node=node)
                metric.labels("released").inc()
                if node is not None:
                    self._write_cluster_credentials(node, release)
                return release
            except BrokerAuthenticationError as exc:  # an impostor: never retried, never used
                metric.labels("unauthenticated").inc()
                raise BootFailed(f"refusing the key broker's answer: {exc}") from None
            except GarbledAnswer as exc:
                why, outcome = f"the key broker's answer is garbled ({exc})", "garbled"
            except requests.Timeout:
                why, outcome = f"the key broker did not answer within {timeout:g}s", "unreachable"
            except requests.exceptions.ChunkedEncodingError:  # fewer bytes than announced
                why, outcome = "the key broker's answer was cut off", "garbled"
            except requests.RequestException as exc:  # refused, reset
                why, outcome = f"key broker unreachable ({type(exc).__name__})", "unreachable"
            except KeyReleaseError as exc:
                status = exc.problem.get("status")
                kind = _printable(exc.problem.get("type", ""))
                if status is None:  # a 200 with the wrong fields, or a key that does not unwrap
                    why, outcome = (
                        f"the key broker's answer is garbled ({_printable(exc)})",
                        "garbled",
                    )
                elif status not in _RETRY_STATUSES:
                    metric.labels("refused").inc()
                    raise BootFailed(
                        f"the key broker refused the key: {status} {kind}".strip()
                    ) from None
                elif kind.endswith("collateral-unavailable"):
                    why = "the key broker has no current attestation collateral (its PCCS)"
                    outcome = "busy"
                else:
                    why, outcome = f"key broker busy ({status})", "busy"
            except GpuEvidenceError as exc:
                metric.labels("quote_failed").inc()
                raise BootFailed(f"cannot produce GPU evidence: {exc}") from None
            except AttestationError as exc:
                metric.labels("quote_failed").inc()
                raise BootFailed(f"cannot produce a quote: {exc}") from None
            metric.labels(outcome).inc()
            log.warning("%s; attempt %d/%d", why, attempt, attempts)
            if attempt == attempts:
                raise BootFailed(
                    f"{why}; gave up after {attempts} attempts (restart the service to retry)"
                )
            self.state.set(
                "attesting", f"{why} (attempt {attempt}/{attempts}); retrying in {delay:g}s"
            )
            sleep(delay)
            delay = min(delay * 2, self.settings.boot_backoff_max_s)
        raise AssertionError("unreachable")

    def _start_vllm(self, checkpoint: Any) -> VllmBackend:
        """Start vLLM's server on this model (sealed: the key goes to its loader) and wait
        until it answers; /ready says how long it has been starting."""
        from tdllm.api.vllm_start import start_vllm
        from tdllm.vllm_engine.child import VllmStartFailed

        handoff, self._handoff = self._handoff, None

        def waiting(seconds: float) -> None:
            self.state.set("loading", f"starting the vLLM engine ({seconds:.0f}s)")

        try:
            return start_vllm(
                self.settings, checkpoint, handoff, waiting, self.deps.restart or restart_worker
            )
        except VllmStartFailed as exc:
            raise BootFailed(exc.diagnostics()) from None

    def _start_engine(self, checkpoint: Any) -> EngineRunner:
        """Build the model for the configured protection profile and start its engine."""
        from tdllm.engine import Engine
        from tdllm.errors import TdllmError
        from tdllm.model.bundled import BUNDLED_NAME
        from tdllm.model.loader import parse_dtype
        from tdllm.profiles import ProtectionOptions, build_model

        s = self.settings
        default_name = BUNDLED_NAME if s.model == "bundled" else checkpoint.name
        context = min(s.context_tokens, checkpoint.config.max_position_embeddings)
        try:
            options = ProtectionOptions(
                s.profile,
                s.device,
                s.k,
                Path(s.public_ref) if s.public_ref else None,
                quant=s.quant,
            )
            if s.profile != "td-only":
                self.state.set("loading", f"offloading the public prefix ({s.profile}, {s.device})")
            served = build_model(checkpoint, parse_dtype(s.dtype), options, s.max_batch, context)
        except TdllmError as exc:
            raise BootFailed(f"cannot build the {s.profile} model: {exc.diagnostics()}") from None
        engine = Engine(
            served.model,
            checkpoint.tokenizer,
            s.max_batch,
            context,
            s.prefill_chunk,
            s.prefix_cache_blocks,
            compile=s.compile,
            status=lambda text: self.state.set("loading", text),
            kv_tokens=s.kv_cache_tokens,
        )
        self.state.metrics.watch_kv(engine)
        offloaded = s.profile != "td-only"
        return EngineRunner(
            engine,
            model_name=s.served_model_name or default_name,
            queue_size=s.queue_size,
            observer=supervised(self.state.metrics.observer(), self.deps.restart or restart_worker),
            protection={
                "profile": s.profile,
                "device": s.device if offloaded else None,
                "k": s.k if offloaded else None,
            },
            served=served,
        ).start()
