"""Liveness (/health: the process answers) and readiness (/ready: completions can be served).

Load balancers and systemd watchdogs need the two apart: a service that is still attesting or
loading is alive (do not restart it) but not ready (do not send it traffic). So is a service
that is draining on its way down (`shutdown`): /health stays 200, /ready says ``draining``.
"""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue

from tdllm.api.shutdown import draining

blueprint = Blueprint("health", __name__)


@blueprint.get("/health")
def health() -> ResponseReturnValue:
    return jsonify({"status": "ok"})


@blueprint.get("/ready")
def ready() -> ResponseReturnValue:
    service = current_app.extensions["tdllm"]
    if draining(service):  # stopping: at once, so a load balancer stops sending
        return jsonify({"ready": False, "phase": "draining", "reason": "draining"}), 503
    state = service.state
    if state.ready:
        return jsonify({"ready": True, "phase": state.phase, "model": state.runner.model_name})
    return jsonify({"ready": False, "phase": state.phase, "reason": state.not_ready_reason()}), 503
