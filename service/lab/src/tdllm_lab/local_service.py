"""Run the real service (gunicorn, `tdllm.api.gunicorn_conf`) on a loopback port, for the
integration tests and `tdllm bench serve`: start, wait for /ready with a deadline, stop."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import requests

from tdllm.settings import service_environment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LocalService:
    """``with LocalService(model="bundled") as svc: svc.url`` (settings as TDLLM_* changes)."""

    # what answers 200 once the service is up: /ready (a model loaded); a subclass whose model
    # cannot load waits for /health (the worker answers) instead
    ready_path = "/ready"

    def __init__(self, *, ready_timeout_s: float = 120.0, log: Path | None = None, **changes: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_timeout_s = ready_timeout_s
        self.env = service_environment(None, host="127.0.0.1", port=str(self.port), **changes)
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalService:
        out = self.log.open("wb") if self.log is not None else subprocess.DEVNULL
        argv = [sys.executable, "-m", "gunicorn", "-c", "python:tdllm.api.gunicorn_conf"]
        try:
            self.process = subprocess.Popen(argv, env=self.env, stdout=out, stderr=out)  # noqa: S603
        finally:
            if self.log is not None:
                out.close()  # type: ignore[union-attr]  # the child holds its own copy
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        assert self.process is not None  # noqa: S101  # set by __enter__
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}")
            try:
                if requests.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise TimeoutError(
            f"the service did not answer {self.ready_path} within {self.ready_timeout_s:g}s"
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
