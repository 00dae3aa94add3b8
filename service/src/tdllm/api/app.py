"""The Flask application factory: `gunicorn 'tdllm.api.app:create_app()'`.

`create_app` resolves settings (unless given), builds metrics and the boot state, and starts
the boot thread; it returns at once, so the worker answers /health while the model is attested
and loaded. Tests pass `engine_runner` (an already running engine) to skip the boot entirely,
`boot_deps` to boot against a simulated TD and broker, and `clock` to date receipts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from flask import Flask, request
from werkzeug.exceptions import RequestEntityTooLarge

from tdllm.api import attestation, e2e, health, metrics, openapi, receipts, shutdown
from tdllm.api.auth import install_api_keys
from tdllm.api.boot import Boot, BootDeps, BootState
from tdllm.api.errors import register_error_handlers
from tdllm.api.evidence_sources import collateral_for, gpu_evidence_for, quote_provider_for
from tdllm.api.identity import ServiceIdentity
from tdllm.api.logs import install_request_logging
from tdllm.api.metrics import ServiceMetrics
from tdllm.api.openai import chat, completions, models, tokenize
from tdllm.api.runner import EngineRunner
from tdllm.settings import Settings, load_settings


@dataclass
class Service:
    """Everything a request handler needs, at ``current_app.extensions["tdllm"]``."""

    settings: Settings
    metrics: ServiceMetrics
    state: BootState
    identity: ServiceIdentity
    boot_deps: BootDeps
    started: int
    boot: Boot | None = None
    # the one wall clock of request handling: receipt times, the TD's check of its own quote
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC), repr=False)
    # SIGTERM/SIGINT: set by the worker (gunicorn_hooks), read by /ready and the OpenAI routes
    drain: shutdown.Drain = field(default_factory=shutdown.Drain, repr=False)


def _refuse_streamed_bodies_over(app: Flask, limit: int) -> None:
    """A 413 for a body without Content-Length (chunked) over `limit`.

    werkzeug stops reading such a body at MAX_CONTENT_LENGTH and returns what it read: the
    handler would see a truncated body, not a refusal. So the body is read here (and cached for
    the handler); when it fills the limit, one more byte from the server's stream decides.
    """

    @app.before_request
    def _read_streamed_body() -> None:
        if request.content_length is None and request.environ.get("wsgi.input_terminated"):
            body = request.get_data()
            if len(body) >= limit and request.environ["wsgi.input"].read(1):
                raise RequestEntityTooLarge()


def create_app(
    settings: Settings | None = None,
    *,
    engine_runner: EngineRunner | None = None,
    boot_deps: BootDeps | None = None,
    clock: Callable[[], datetime] | None = None,
) -> Flask:
    settings = settings or load_settings()
    deps = boot_deps or BootDeps()
    app = Flask("tdllm.api")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep OpenAI's field order
    service_metrics = ServiceMetrics()
    state = BootState(service_metrics)
    state.quote_provider, state.simulated = quote_provider_for(settings, deps.quote_provider)
    state.collateral = collateral_for(settings, deps.collateral, state.quote_provider)
    state.gpu_evidence = gpu_evidence_for(settings, deps.gpu_evidence)
    service = Service(settings, service_metrics, state, ServiceIdentity(), deps, int(time.time()))
    if clock is not None:
        service.clock = clock
    app.extensions["tdllm"] = service

    def observe(endpoint: str, status: int, duration: float) -> None:
        service_metrics.requests.labels(endpoint, str(status)).inc()
        service_metrics.latency.labels(endpoint).observe(duration)

    install_request_logging(app, observe)
    install_api_keys(app, settings.api_keys)
    _refuse_streamed_bodies_over(app, settings.max_body_bytes)
    register_error_handlers(app)
    shutdown.install(app, service.drain)
    blueprints = (
        health, metrics, openapi, attestation, receipts, models, completions, chat, tokenize, e2e,
    )  # fmt: skip
    for module in blueprints:
        app.register_blueprint(module.blueprint)

    if engine_runner is not None:
        engine_runner.observer = service_metrics.observer()
        if isinstance(engine_runner, EngineRunner):  # not vLLM's backend: its KV is its own
            service_metrics.watch_kv(engine_runner.engine)
        state.runner = engine_runner
        state.set("ready", "ready")
    else:
        service.boot = Boot(settings, state, deps, on_ready=lambda: receipts.prepare(app)).start()
    return app
