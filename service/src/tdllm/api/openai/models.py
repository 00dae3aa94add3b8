"""GET /v1/models: the one model this service runs (the list is empty until boot is done)."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue

from tdllm.api.errors import ApiError
from tdllm.api.runner import EngineRunner
from tdllm.vllm_engine.backend import VllmBackend

blueprint = Blueprint("models", __name__)
OWNER = "tdllm"


def _card(runner: EngineRunner | VllmBackend, created: int) -> dict[str, object]:
    """OpenAI's model object plus vLLM's `max_model_len` and ours: `tdllm` says how the model
    is protected, which engine runs it and the owner's `logprobs_policy` (both engines)."""
    policy = current_app.extensions["tdllm"].settings.logprobs_policy
    return {
        "id": runner.model_name,
        "object": "model",
        "created": created,
        "owned_by": OWNER,
        "max_model_len": runner.max_model_len,
        "tdllm": dict(runner.protection) | {"engine": runner.engine_name, "logprobs": policy},
    }


@blueprint.get("/v1/models")
def list_models() -> ResponseReturnValue:
    service = current_app.extensions["tdllm"]
    runner = service.state.runner if service.state.ready else None
    cards = [_card(runner, service.started)] if runner is not None else []
    return jsonify({"object": "list", "data": cards})


@blueprint.get("/v1/models/<path:model>")
def retrieve_model(model: str) -> ResponseReturnValue:
    service = current_app.extensions["tdllm"]
    runner = service.state.runner if service.state.ready else None
    if runner is None or model != runner.model_name:
        raise ApiError(404, "no such model", "invalid_request_error", "model", "model_not_found")
    return jsonify(_card(runner, service.started))
