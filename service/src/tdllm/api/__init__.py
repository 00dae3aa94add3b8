"""The appliance's REST service: an OpenAI-compatible API, health, metrics and attestation.

`app.create_app` builds the Flask application; `boot` brings the model up in the background
(attesting to the key broker for sealed models); `runner` owns the engine on one thread and
batches every request's decode steps together; `openai/` holds the OpenAI-shaped endpoints.
"""
