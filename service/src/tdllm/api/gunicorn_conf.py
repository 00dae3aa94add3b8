"""gunicorn settings for `tdllm serve` (``gunicorn -c python:tdllm.api.gunicorn_conf``).

One worker, many threads: the model and its KV cache exist once per process, so more workers
would multiply memory for no throughput (the engine thread batches every request anyway). The
gthread worker's main loop keeps heartbeating while threads stream, so long generations do not
trip `timeout`. The app is not preloaded: the model loads (and the TD attests) in the worker.
"""

from __future__ import annotations

from tdllm.api.logs import logging_config
from tdllm.settings import load_settings

_settings = load_settings()

bind = [f"{_settings.host}:{_settings.port}"]
workers = 1
worker_class = "gthread"
threads = _settings.threads
timeout = 60
graceful_timeout = 30
keepalive = 5
preload_app = False
limit_request_line = 8190
limit_request_fields = 64
logconfig_dict = logging_config(_settings.log_level)
accesslog = None  # tdllm.api.logs writes one JSON line per request instead
wsgi_app = "tdllm.api.app:create_app()"
