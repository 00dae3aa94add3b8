"""Start, watch and stop vLLM's OpenAI server as a child of the service.

The child is `python -m tdllm_vllm.launch` from the vLLM virtual environment, in its own
session (so it and vLLM's engine processes stop as one group), with:

- a private run directory (mode 0700, on /dev/shm when it is there: memory, not disk) holding
  the model directory (config and tokenizer, `model_dir`), the socket vLLM listens on, and
  vLLM's caches and temporary files (HOME, TMPDIR and VLLM_CACHE_ROOT point into it), removed
  when the child stops;
- the loader channel (`loader_channel`): a one-shot socket in that directory that gives the
  data key (sealed models) to vLLM's loading worker only, and brings the load's outcome back
  (so /ready can say why a load failed);
- an inherited lifeline pipe, whose end the service holds and never writes: when the service
  dies, vLLM stops (tdllm_vllm.launch);
- an environment built from nothing: no inherited secrets, offline Hugging Face, no usage
  statistics sent anywhere, and only the tdllm plugin loaded (VLLM_PLUGINS).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.client import HTTPConnection
from pathlib import Path

from tdllm.errors import TdllmError
from tdllm.model.checkpoint import Checkpoint
from tdllm.sealing.keys import wipe
from tdllm.vllm_engine.args import option_value
from tdllm.vllm_engine.loader_channel import LoaderChannel
from tdllm.vllm_engine.model_dir import write_model_dir
from tdllm.vllm_engine.socket_http import UnixHTTPConnection

log = logging.getLogger("tdllm.vllm")
SOCKET_NAME = "vllm.sock"
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# passed through from the service's environment when set: capacity and placement, no secrets
PASSED_ENVIRONMENT = (
    "OMP_NUM_THREADS",
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_CPU_NUM_OF_RESERVED_CPU",
    "CUDA_VISIBLE_DEVICES",
    # scale-out (docs/scale-out.md): the Ray cluster of attested TDs and its TLS material (paths)
    "RAY_ADDRESS",
    "RAY_USE_TLS",
    "RAY_TLS_SERVER_CERT",
    "RAY_TLS_SERVER_KEY",
    "RAY_TLS_CA_CERT",
    "VLLM_HOST_IP",
    "GLOO_SOCKET_IFNAME",
    "TDLLM_VLLM_RAY_ON_CPU",
)
_POLL_S = 0.5
_STOP_GRACE_S = 20.0


class VllmStartFailed(TdllmError):  # noqa: N818  # reads as the event
    """vLLM did not come up; the message is the not-ready reason (no secrets in it)."""


@dataclass
class SealedHandoff:
    """What the loader needs to open the sealed model the service verified, and nothing else."""

    key: bytearray
    identity: dict[str, str]  # Checkpoint.identity: model_id and manifest_sha256
    model: str
    version: int


@dataclass(frozen=True)
class VllmLaunch:
    """How to start vLLM for one model (resolved from Settings by the boot)."""

    python: Path
    source: str  # what the loader opens: the sealed directory, or a plain source
    served_name: str
    dtype: str  # fp32 | bf16
    max_model_len: int
    max_num_seqs: int
    extra_args: tuple[str, ...] = ()
    # CPU: the KV cache vLLM allocates up front (VLLM_CPU_KVCACHE_SPACE); left alone, vLLM takes
    # most of the machine's memory and spends minutes touching it at every start
    kv_cache_gib: int | None = None
    # vLLM's own cap on top logprobs (--max-logprobs), behind the front's logprobs_policy
    max_logprobs: int = 0
    # bench only (`tdllm bench serve --engine vllm-alone`): listen on 127.0.0.1:tcp_port instead
    # of the private Unix socket, to measure vLLM without the service in front. The service
    # never sets it: a TCP port would let any local process reach the model around the front.
    tcp_port: int | None = None


def kv_cache_gib(checkpoint: Checkpoint, dtype: str, tokens: int) -> int:
    """GiB of KV cache for `tokens` positions (the tdllm engine's KV budget for the same
    settings), at least 1: keys and values of every layer's KV heads."""
    config = checkpoint.config
    element = 4 if dtype == "fp32" else 2
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * element
    return max(1, -(-tokens * per_token // (1 << 30)))


def run_directory() -> Path:
    """A fresh private directory, in memory when /dev/shm is there."""
    shm = Path("/dev/shm")  # noqa: S108  # mkdtemp below: a fresh 0700 directory, no guessing
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="tdllm-vllm-", dir=base))


@dataclass
class VllmProcess:
    """One vLLM server for one model; `start`, then `wait_ready`, then serve until `stop`."""

    launch: VllmLaunch
    run_dir: Path = field(default_factory=run_directory)
    process: subprocess.Popen[bytes] | None = None
    channel: LoaderChannel | None = None
    _lifeline: int | None = None  # write end, held until stop
    _stopping: bool = False

    @property
    def socket_path(self) -> str:
        return str(self.run_dir / SOCKET_NAME)

    def start(self, checkpoint: Checkpoint, sealed: SealedHandoff | None) -> None:
        """Write the model directory and start the child; `sealed.key` is wiped here."""
        child_fds: list[int] = []
        try:
            model_dir = write_model_dir(checkpoint, self.run_dir / "model")
            for sub in ("home", "tmp", "cache"):
                (self.run_dir / sub).mkdir(mode=0o700)
            key = bytearray(sealed.key) if sealed is not None else None
            self.channel = LoaderChannel(self.run_dir / "loader.sock", key).start()
            lifeline_r, self._lifeline = os.pipe()
            child_fds.append(lifeline_r)
            loader: dict[str, object] = {
                "source": self.launch.source,
                "channel": str(self.channel.path),
            }
            if sealed is not None:
                loader |= {
                    "model_id": sealed.identity["model_id"],
                    "manifest_sha256": sealed.identity["manifest_sha256"],
                    "model": sealed.model,
                    "version": sealed.version,
                }
            command = self._command(model_dir, loader, sealed is not None, lifeline_r)
            self.process = subprocess.Popen(  # noqa: S603  # our own argv, no shell
                command,
                env=self._environment(),
                pass_fds=child_fds,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                cwd=self.run_dir,
            )
            self.channel.child_pid = self.process.pid
            log.info("vLLM started (pid %d), socket %s", self.process.pid, self.socket_path)
        except OSError as exc:
            self.stop()
            raise VllmStartFailed(f"cannot start vLLM ({self.launch.python}): {exc}") from None
        finally:
            if sealed is not None:
                wipe(sealed.key)
            for fd in child_fds:
                os.close(fd)

    def _command(
        self, model_dir: Path, loader: dict[str, object], sealed: bool, lifeline: int
    ) -> list[str]:
        launch = self.launch
        args = [
            str(launch.python), "-m", "tdllm_vllm.launch", "--lifeline-fd", str(lifeline), "--",
            "--model", str(model_dir),
            "--served-model-name", launch.served_name,
            *self._listen_args(),
            "--load-format", "tdllm-sealed" if sealed else "tdllm",
            "--model-loader-extra-config", json.dumps(loader),
            "--dtype", VLLM_DTYPES[launch.dtype],
            "--disable-uvicorn-access-log",
        ]  # fmt: skip
        if option_value(launch.extra_args, "--max-model-len") is None:
            args += ["--max-model-len", str(launch.max_model_len)]
        if option_value(launch.extra_args, "--max-num-seqs") is None:
            args += ["--max-num-seqs", str(launch.max_num_seqs)]
        if option_value(launch.extra_args, "--max-logprobs") is None:
            args += ["--max-logprobs", str(launch.max_logprobs)]
        return args + list(launch.extra_args)

    def _listen_args(self) -> list[str]:
        if self.launch.tcp_port is not None:  # bench only (VllmLaunch.tcp_port)
            return ["--host", "127.0.0.1", "--port", str(self.launch.tcp_port)]
        return ["--uds", self.socket_path]

    def _environment(self) -> dict[str, str]:
        run = self.run_dir
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(run / "home"),
            "TMPDIR": str(run / "tmp"),
            "VLLM_CACHE_ROOT": str(run / "cache"),
            "VLLM_PLUGINS": "tdllm",
            "VLLM_WORKER_MULTIPROC_METHOD": "fork",  # the key and status pipes are inherited
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        if self.launch.kv_cache_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.launch.kv_cache_gib)
        env |= {name: os.environ[name] for name in PASSED_ENVIRONMENT if name in os.environ}
        return env

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout_s: float, waiting: Callable[[float], None] | None = None) -> None:
        """Until vLLM answers /health: raise `VllmStartFailed` if the load failed, the child
        exited, or `timeout_s` passed. `waiting(seconds)` is called on each poll (/ready)."""
        started = time.monotonic()
        while True:
            failed = self._loader_failure()
            if failed is not None:
                self.stop()
                raise VllmStartFailed(f"vLLM could not load the model: {failed}")
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                failed = self._loader_failure()
                self.stop()
                why = f": {failed}" if failed else ""
                raise VllmStartFailed(f"vLLM exited during start (code {code}){why}")
            if self.healthy():
                log.info("vLLM ready after %.1fs", time.monotonic() - started)
                return
            elapsed = time.monotonic() - started
            if elapsed > timeout_s:
                self.stop()
                raise VllmStartFailed(f"vLLM did not become ready within {timeout_s:g}s")
            if waiting is not None:
                waiting(elapsed)
            time.sleep(_POLL_S)

    def healthy(self) -> bool:
        connection: HTTPConnection
        if self.launch.tcp_port is not None:  # bench only (VllmLaunch.tcp_port)
            connection = HTTPConnection("127.0.0.1", self.launch.tcp_port, timeout=5.0)
        else:
            connection = UnixHTTPConnection(self.socket_path, timeout=5.0)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status == HTTPStatus.OK
        except OSError:
            return False
        finally:
            connection.close()

    def _loader_failure(self) -> str | None:
        return self.channel.failure() if self.channel is not None else None

    def stop(self, timeout_s: float = _STOP_GRACE_S) -> None:
        """SIGTERM the server (vLLM stops its engine processes), SIGKILL the group after
        `timeout_s`, then remove the run directory. Safe to call more than once."""
        self._stopping = True
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("vLLM did not stop within %gs; killing its process group", timeout_s)
        if process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # engine processes left behind
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5.0)
        if self.channel is not None:
            self.channel.close()
        if self._lifeline is not None:
            with contextlib.suppress(OSError):
                os.close(self._lifeline)
            self._lifeline = None
        shutil.rmtree(self.run_dir, ignore_errors=True)

    @property
    def stopping(self) -> bool:
        return self._stopping
